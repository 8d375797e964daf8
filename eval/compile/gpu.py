"""Deviceless NVIDIA H100 (sm_90a) compiles: target, ptxas log and thunk parsing.

XLA compiles for a GPU described by a `GpuTargetConfigProto` (text form) on a
machine without one. The text for the H100 SXM is the one XLA ships: it is
read at run time from the installed `jax-cuda12-pjrt` plugin, which embeds
XLA's per-GPU specs; nothing is copied into this repository.
"""

from __future__ import annotations

import pathlib
import re

DEVICE_NAME = "NVIDIA H100 80GB HBM3"
KERNEL_TARGET = "__gpu$xla.gpu.triton"
ENV = {"JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
       "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "subprocess_compilation=3"}
# XLA rewrites large sorts (the superlinear glue's argsort from L = 32K) into
# a CUB radix sort whose scratch size is queried from the CUDA runtime while
# compiling: without a device that fails ("cudaErrorInvalidDevice: invalid
# device ordinal"). XLA's own sort kernel is compiled instead; the Pallas
# kernels are unaffected.
COMPILER_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False}


def plugin_library() -> pathlib.Path:
  """Path of the CUDA PJRT plugin's shared library (ImportError if not installed)."""
  import jax_plugins.xla_cuda12 as plugin  # from jax-cuda12-pjrt
  return pathlib.Path(plugin.__file__).parent / "xla_cuda_plugin.so"


def h100_target_config() -> str:
  """The `GpuTargetConfigProto` text of the H100 SXM, taken from the plugin."""
  data = plugin_library().read_bytes()
  tail = f'device_description_str: "{DEVICE_NAME}"\n'.encode()
  end = data.find(tail)
  if end < 0:
    raise RuntimeError(f"no {DEVICE_NAME!r} target config in {plugin_library()}")
  start = data.rfind(b"gpu_device_info {", 0, end)
  return (data[start:end] + tail).decode()


def smem_limit(config_text: str) -> int:
  """Opt-in shared memory per block (bytes) of the target."""
  return int(re.search(r"shared_memory_per_block_optin: (\d+)", config_text).group(1))


def ptxas_path() -> pathlib.Path | None:
  try:
    import nvidia.cuda_nvcc as nvcc  # from nvidia-cuda-nvcc-cu12
  except ImportError:
    return None
  path = pathlib.Path(list(nvcc.__path__)[0]) / "bin" / "ptxas"
  return path if path.exists() else None


def ptxas_version() -> str:
  import subprocess
  path = ptxas_path()
  if path is None:
    return "missing"
  out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
  m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
  return m.group(2) if m else out.strip().splitlines()[-1]


def device():
  """A compile-only H100 device (jax must already be imported with ENV set)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                      target_config=h100_target_config(),
                                      topology="1x1x1")
  return topo.devices[0]


_LOG_START = re.compile(r"^[IWEF]\d{4} ", re.M)


def parse_ptxas(log: str) -> dict[str, dict]:
  """Per entry function of a `ptxas -v` log: registers, spills, stack.

  Returns {name: {"registers", "spill_stores", "spill_loads", "stack"}}; a
  name compiled twice keeps the larger numbers.
  """
  out: dict[str, dict] = {}
  for msg in _LOG_START.split(log):
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", msg):
      name = re.search(r"Compiling entry function '([^']+)'", block)
      if not name:
        continue
      rec = {"registers": _int(r"Used (\d+) registers", block),
             "spill_stores": _int(r"(\d+) bytes spill stores", block),
             "spill_loads": _int(r"(\d+) bytes spill loads", block),
             "stack": _int(r"(\d+) bytes stack frame", block)}
      old = out.get(name.group(1))
      out[name.group(1)] = rec if old is None else {k: max(rec[k], old[k]) for k in rec}
  return out


def _int(pattern: str, text: str) -> int:
  m = re.search(pattern, text)
  return int(m.group(1)) if m else 0


_THUNK = re.compile(r"\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                    r"shared_memory: (\d+) bytes")


def parse_thunks(text: str) -> dict[str, dict]:
  """Per kernel of a `*thunk_sequence.txt` dump: grid, threads, shared memory."""
  out = {}
  for m in _THUNK.finditer(text):
    name, grid, threads, smem = m.groups()
    out[name] = {"grid": [int(x) for x in grid.split(",")],
                 "threads": [int(x) for x in threads.split(",")], "smem": int(smem)}
  return out


def triton_kernels(hlo_text: str) -> list[tuple[str, str]]:
  """(name, op path) of each Triton (Pallas) kernel in an optimized HLO module.

  The op path is the HLO metadata's `op_name` without its outer `jit(...)`,
  e.g. `transpose(jvp(jit(ppa_attention)))/cond/branch_0_fun/pallas_call` (a
  backward kernel).
  """
  out = []
  for line in hlo_text.splitlines():
    if KERNEL_TARGET in line:
      m = re.search(r'name = \\?"([^"\\]+)', line)
      op = re.search(r'op_name="([^"]+)"', line)
      out.append((m.group(1) if m else "?", op.group(1).split("/", 1)[-1] if op else ""))
  return out


def triton_kernel_names(hlo_text: str) -> list[str]:
  """Names of the Triton (Pallas) kernels in an optimized HLO module."""
  return [name for name, _ in triton_kernels(hlo_text)]


def compiled_entries(base: str, names) -> list[str]:
  """The compiled kernels of HLO kernel name `base` among `names` (ptxas entry
  functions or thunks): XLA keeps the first as `base` and renames the others
  `base__1`, `base__2`, ... when several kernels share a name."""
  pat = re.compile(re.escape(base) + r"(__\d+)?")
  return sorted((n for n in names if pat.fullmatch(n)),
                key=lambda n: (len(n), n))


def dump_text(dump_dir: str, suffix: str) -> str:
  files = sorted(pathlib.Path(dump_dir).glob(f"*{suffix}"))
  return "\n".join(f.read_text(errors="replace") for f in files)
