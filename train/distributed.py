"""Multi-process (multi-host) start-up.

`initialize()` must run before anything touches a JAX backend. It calls
`jax.distributed.initialize` when the environment describes a multi-process
job, and does nothing for a single process:

1. Explicit (any launcher, e.g. several processes on one machine, or hosts
   started by hand / by a script):
     TRAIN_COORDINATOR_ADDRESS  host:port of process 0 (reachable by all)
     TRAIN_NUM_PROCESSES        total number of processes
     TRAIN_PROCESS_ID           this process's rank, 0 .. N-1
     TRAIN_LOCAL_DEVICE_IDS     optional, comma-separated local device ids
   (`jax.distributed.initialize(coordinator_address=..., num_processes=...,
   process_id=...)`).
2. Auto-detected by JAX itself (`jax.distributed.initialize()` with no
   arguments): Cloud TPU pod slices / multislice, Slurm (`srun`, more than one
   task), Open MPI (`mpirun`, more than one rank), or JAX's own
   `JAX_COORDINATOR_ADDRESS`.
3. `TRAIN_DISTRIBUTED=0` disables both; `TRAIN_DISTRIBUTED=1` forces the
   auto-detect call.

See docs/training.md for TPU pod and multi-node GPU recipes.
"""

from __future__ import annotations

import os
import sys

_initialized = False


def _int_env(name: str) -> int:
  value = os.environ[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r}: expected an integer") from None


def detect() -> str | None:
  """Which multi-process environment this is: "explicit", "auto" or None."""
  env = os.environ
  mode = env.get("TRAIN_DISTRIBUTED", "").strip().lower()
  if mode in ("0", "false", "off", "no"):
    return None
  if env.get("TRAIN_COORDINATOR_ADDRESS"):
    return "explicit"
  if mode in ("1", "true", "on", "yes"):
    return "auto"
  hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hostnames or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "auto"  # multi-host Cloud TPU
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(env.get(name, "1")) > 1:
        return "auto"
    except ValueError:
      pass
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "auto"
  return None


def initialize() -> tuple[int, int]:
  """Joins the multi-process job if there is one; returns (index, count)."""
  global _initialized
  import jax
  if not _initialized:
    mode = detect()
    if mode == "explicit":
      missing = [n for n in ("TRAIN_NUM_PROCESSES", "TRAIN_PROCESS_ID") if n not in os.environ]
      if missing:
        raise ValueError(f"TRAIN_COORDINATOR_ADDRESS is set but {', '.join(missing)} "
                         "is not")
      kwargs = dict(coordinator_address=os.environ["TRAIN_COORDINATOR_ADDRESS"],
                    num_processes=_int_env("TRAIN_NUM_PROCESSES"),
                    process_id=_int_env("TRAIN_PROCESS_ID"))
      if os.environ.get("TRAIN_LOCAL_DEVICE_IDS"):
        kwargs["local_device_ids"] = [
            int(x) for x in os.environ["TRAIN_LOCAL_DEVICE_IDS"].split(",") if x.strip()]
      jax.distributed.initialize(**kwargs)
    elif mode == "auto":
      jax.distributed.initialize()
    _initialized = True
    if mode is not None:
      print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices",
            file=sys.stderr, flush=True)
  return jax.process_index(), jax.process_count()


def shutdown():
  global _initialized
  if _initialized:
    import jax
    try:
      jax.distributed.shutdown()
    except Exception:
      pass
