"""Report of the kernel benchmark: targets (PASS / FAIL / NOT MEASURED)
from the measured cells, and the markdown section of `benchmarks.md`.

Targets are defined on an NVIDIA GPU at the full sizes (bf16, head_dim
128, GQA 32:8); a target whose cells were not measured (skipped for the
budget, out of memory, failed, or no GPU) reads NOT MEASURED.
"""

from __future__ import annotations

import dataclasses
import os

from eval.bench_plan import (BWD_FACTOR, LONG_CALL_S, MEMORY_FRACTION, Case, Config,
                             fmt_bytes, fmt_len, fmt_time, mode_lengths)

BEGIN, END = "<!-- bench_kernels:begin -->", "<!-- bench_kernels:end -->"

# ------------------------------------------------------------------ targets


def _cell(cells, name, seq_len, mode="fwd"):
  c = cells.get(name, {}).get(str(seq_len), {}).get(mode)
  return c if c and c.get("status") == "ok" else None


TARGET_NAMES = (
    "dense causal forward >= 50% of cuDNN TFLOP/s (every L >= 4K)",
    "sliding-window time per token flat in L (max/min over L >= 8K <= 1.25)",
    "90%-sparse layout >= 5x faster than every tile at 32K (forward)",
)
SUPERLINEAR_CONFIGS = ("default", "released")


def superlinear_target_names(config_name: str) -> tuple[str, ...]:
  return (f"superlinear ({config_name}) forward faster than cuDNN dense at every L >= 32K",
          f"superlinear ({config_name}) forward >= 5x faster than cuDNN dense at 128K",
          f"superlinear ({config_name}) forward runs at 1M",
          f"superlinear ({config_name}) decode at a 1M cache >= 10x faster than dense decode")


def _all_target_names():
  names = list(TARGET_NAMES)
  for c in SUPERLINEAR_CONFIGS:
    names += superlinear_target_names(c)
  return names


def _block_sparse_targets(cells, lengths):
  res = []
  ratios = []
  for seq_len in lengths:
    ours, ref = _cell(cells, "pallas_dense_causal", seq_len), _cell(cells, "cudnn_dense_causal", seq_len)
    if seq_len >= 4096 and ours and ref:
      ratios.append((seq_len, ours["tflops"] / ref["tflops"]))
  if ratios:
    ok = all(r >= 0.5 for _, r in ratios)
    res.append((TARGET_NAMES[0], "PASS" if ok else "FAIL",
                ", ".join(f"{fmt_len(l)}: {r:.0%}" for l, r in ratios)))
  else:
    res.append((TARGET_NAMES[0], "NOT MEASURED", "no pair of measured cells"))
  per_token = [(l, c["time_s"] / l) for l in lengths
               if l >= 8192 and (c := _cell(cells, "pallas_window", l))]
  if len(per_token) >= 2:
    vals = [t for _, t in per_token]
    spread = max(vals) / min(vals)
    res.append((TARGET_NAMES[1], "PASS" if spread <= 1.25 else "FAIL",
                f"max/min = {spread:.2f} over {', '.join(fmt_len(l) for l, _ in per_token)}"))
  else:
    res.append((TARGET_NAMES[1], "NOT MEASURED", "fewer than two lengths >= 8K measured"))
  sparse, full = _cell(cells, "pallas_sparse90", 32768), _cell(cells, "pallas_full", 32768)
  if sparse and full:
    speed = full["time_s"] / sparse["time_s"]
    res.append((TARGET_NAMES[2], "PASS" if speed >= 5 else "FAIL", f"{speed:.1f}x"))
  else:
    res.append((TARGET_NAMES[2], "NOT MEASURED", "32K cells not measured"))
  return res


def _superlinear_targets(cells, lengths, decode_lengths, config_name):
  names = superlinear_target_names(config_name)
  ours_name = f"superlinear_{config_name}"
  res = []
  speed = {l: r["time_s"] / o["time_s"] for l in lengths
           if l >= 32768 and (o := _cell(cells, ours_name, l))
           and (r := _cell(cells, "cudnn_dense_causal", l))}
  if 32768 in speed:
    ok = all(s > 1 for s in speed.values())
    res.append((names[0], "PASS" if ok else "FAIL",
                ", ".join(f"{fmt_len(l)}: {s:.2f}x" for l, s in sorted(speed.items()))))
  else:
    res.append((names[0], "NOT MEASURED", "32K pair (ours, cuDNN) not measured"))
  if 131072 in speed:
    res.append((names[1], "PASS" if speed[131072] >= 5 else "FAIL", f"{speed[131072]:.2f}x"))
  else:
    res.append((names[1], "NOT MEASURED", "128K pair (ours, cuDNN) not measured"))
  c = cells.get(ours_name, {}).get(str(1 << 20), {}).get("fwd")
  if c and c.get("status") == "ok":
    res.append((names[2], "PASS", f"{fmt_time(c['time_s'])}"))
  elif c and c.get("status") == "failed":
    res.append((names[2], "FAIL", c.get("reason", "failed")[:120]))
  else:
    res.append((names[2], "NOT MEASURED",
                (c or {}).get("reason", "1M forward not part of this run")[:120]))
  dec = _cell(cells, f"decode_superlinear_{config_name}", 1 << 20, "decode")
  dense = [(n, d["time_s"]) for n in ("decode_dense_cudnn", "decode_dense_xla")
           if (d := _cell(cells, n, 1 << 20, "decode"))]
  if dec and dense:
    base, t = min(dense, key=lambda x: x[1])   # the faster dense decode is the baseline
    s = t / dec["time_s"]
    res.append((names[3], "PASS" if s >= 10 else "FAIL", f"{s:.1f}x vs `{base}`"))
  else:
    res.append((names[3], "NOT MEASURED", "1M decode pair not measured"))
  return res


def targets(data) -> list[tuple[str, str, str]]:
  """`(target, PASS | FAIL | NOT MEASURED, evidence)` computed from the cells."""
  info, cells, quick = data["device"], data["cells"], data["quick"]
  if info["platform"] != "gpu" or quick:
    why = ("quick mode: tiny shapes in interpret mode" if quick
           else f"targets are defined on an NVIDIA GPU; this run is on {info['platform']}")
    return [(n, "NOT MEASURED", why) for n in _all_target_names()]
  cfg = data["config"]
  lengths = cfg["lengths"]
  res = _block_sparse_targets(cells, lengths)
  for c in SUPERLINEAR_CONFIGS:
    res += _superlinear_targets(cells, lengths, cfg.get("decode_lengths", ()), c)
  return res


# ------------------------------------------------------------------- report


def _config_of(data) -> Config:
  fields = {f.name for f in dataclasses.fields(Config)}
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()
         if k in fields}
  return Config(**cfg)


def _table(data, mode, key, fmt, by_name):
  config = _config_of(data)
  names = [n for n in data["cases"] if n in by_name and mode_lengths(by_name[n], mode, config)]
  lengths = sorted({l for n in names for l in mode_lengths(by_name[n], mode, config)})
  if not names:
    return []
  rows = ["| case | " + " | ".join(fmt_len(l) for l in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
  for name in names:
    cells = []
    for l in lengths:
      c = data["cells"].get(name, {}).get(str(l), {}).get(mode, {})
      if c.get("status") == "ok":
        cells.append(fmt(c[key]))
      elif c.get("status") == "skipped":
        cells.append(f"skipped: {c['reason']}")
      else:
        cells.append("failed" if c else "-")
    rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return rows


def _case_stub(name, data) -> Case:
  """A Case carrying the modes/max_len recorded in the JSON (for tables)."""
  meta = data.get("case_meta", {}).get(name, {})
  return Case(name, data["labels"].get(name, name), meta.get("family", "?"), None,
              tuple(meta.get("modes", ("fwd", "fwdbwd"))), meta.get("max_len"))


def markdown(data) -> str:
  cfg, info = data["config"], data["device"]
  by_name = {n: _case_stub(n, data) for n in data["cases"]}
  out = [BEGIN, "", "# Kernel benchmarks (`python -m eval.bench_kernels`)", ""]
  status = "" if data.get("complete", True) else " **The run did not finish (partial results).**"
  out.append(f"Generated by `python -m eval.bench_kernels {' '.join(data['argv'])}` on "
             f"{data['date']}; wall time {data.get('wall_s', 0):.0f} s.{status}"
             + (f" Planned {sum(len(c['modes']) for c in data['plan'])} cells, estimated "
                f"{data['plan_estimate_s']:.0f} s before the run (roofline model + compile "
                "allowance, not a measurement)." if data.get("plan") else ""))
  out.append("")
  mem = info.get("memory_bytes")
  out.append(f"- Device: {info['device_kind']} (platform `{info['platform']}`"
             + (f", {fmt_bytes(mem)} usable" if mem else "") + f"), jax "
             f"{info['jax']}, Python {info['python']}."
             + (" **Quick mode: tiny shapes, kernels in Pallas interpret mode on CPU; the "
                "numbers say nothing about kernel speed.**" if data["quick"] else ""))
  out.append(f"- Shapes: batch {cfg['batch']}, {cfg['q_heads']} query heads : "
             f"{cfg['kv_heads']} kv heads, head_dim {cfg['head_dim']}, {cfg['dtype']}; "
             f"window {cfg['window']}; sparse layout: {cfg['sparse_block']}-blocks, "
             f"{cfg['sparse_density']:.0%} of all tiles; PPA window {cfg.get('ppa_window')}. "
             f"Forward+backward up to L = {fmt_len(cfg.get('max_backward_len', 0))}; "
             "decode: one query token at the end of a cache of L tokens.")
  limits = data.get("limits", {})
  out.append(f"- Time: median of {data['repeats']} call(s) of the AOT-compiled function "
             f"after a warm-up (`block_until_ready`; calls over {LONG_CALL_S:g} s timed once). "
             "TFLOP/s on attended entries only: "
             f"forward `4 * head_dim` per entry (span-search: `2 * head_dim` per scored "
             f"anchor), forward+backward {BWD_FACTOR}x that. Memory: compiled arguments + "
             "outputs + temporaries. `failed`: did not build, compile or run here (reason in "
             "the JSON); `skipped`: not run, for the reason given (compiled memory over "
             f"{MEMORY_FRACTION:.0%} of the device, time per call extrapolated over the cap "
             f"{limits.get('cell_cap_s')} s, run budget {limits.get('budget_s')} s); "
             "`-`: not reached.")
  out.append("")
  out.append("Cases:")
  out.append("")
  for name in data["cases"]:
    out.append(f"- `{name}`: {data['labels'][name]}")
  for title, mode, key, fmt in (
      ("Forward time", "fwd", "time_s", fmt_time),
      ("Forward TFLOP/s (attended entries)", "fwd", "tflops", lambda x: f"{x:.3g}"),
      ("Memory, forward", "fwd", "mem_bytes", fmt_bytes),
      ("Forward + backward time", "fwdbwd", "time_s", fmt_time),
      ("Forward + backward TFLOP/s (attended entries)", "fwdbwd", "tflops", lambda x: f"{x:.3g}"),
      ("Memory, forward + backward", "fwdbwd", "mem_bytes", fmt_bytes),
      ("Decode latency per token (cache length L)", "decode", "time_s", fmt_time),
      ("Memory, decode", "decode", "mem_bytes", fmt_bytes)):
    rows = _table(data, mode, key, fmt, by_name)
    if rows:
      out += ["", f"## {title}", ""] + rows
  out += ["", "## Targets", "", "| target | result | evidence |", "|---|---|---|"]
  for name, verdict, why in data["targets"]:
    out.append(f"| {name} | {verdict} | {why} |")
  if data.get("warnings"):
    out += ["", "## Warnings", ""] + [f"- {w}" for w in data["warnings"]]
  out += ["", END]
  return "\n".join(out) + "\n"


def write_section(md_path: str, section: str):
  """Replaces the marked section of `md_path` (appends it if absent)."""
  text = ""
  if os.path.exists(md_path):
    with open(md_path) as fh:
      text = fh.read()
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    text = head + section.rstrip("\n") + tail
  else:
    text = (text.rstrip("\n") + "\n\n" if text else "") + section
  with open(md_path, "w") as fh:
    fh.write(text)

