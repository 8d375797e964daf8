"""NIAH report: heatmaps, the grid as text, summaries, targets and `<name>.md`."""

from __future__ import annotations

import json
import os

import numpy as np

from eval.niah.tasks import PasskeyTask, TextNeedleTask, marker_positions
from eval.niah.training import VARIANTS

__all__ = ["beyond_window", "format_grid", "plot_heatmap", "summary", "targets",
           "write_report"]


def plot_heatmap(grid, lengths, depths, path, *, title: str):
  """Kamradt-style heatmap: depth % on y (0 at top), length on x, accuracy colour."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LinearSegmentedColormap

  grid = np.asarray(grid, dtype=np.float64)
  cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
  fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.2, 0.36 * len(depths) + 1.6))
  im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
  for (r, c), value in np.ndenumerate(grid):
    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth (%)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_grid(grid, lengths, depths) -> str:
  """The depth x length grid as aligned text (rows: depth %, columns: length)."""
  grid = np.asarray(grid)
  head = "depth% " + "".join(f"{n:>7d}" for n in lengths)
  rows = [f"{100 * d:5.0f}  " + "".join(f"{v:7.2f}" for v in grid[i])
          for i, d in enumerate(depths)]
  return "\n".join([head] + rows + ["mean   " + "".join(f"{v:7.2f}" for v in grid.mean(0))])


def _atomic_json(obj, path):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _mean_grid(runs, key="grid"):
  return np.mean([np.asarray(r[key]) for r in runs], axis=0)


def _variant_runs(results):
  by_variant = {}
  for run in results["runs"].values():
    by_variant.setdefault(run["variant"], []).append(run)
  order = [v for v in VARIANTS if v in by_variant]
  return {v: sorted(by_variant[v], key=lambda r: r["seed"]) for v in order}


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


def _task_of(settings):
  t = dict(settings["task"])
  if settings.get("task_kind", "passkey") == "text":
    return TextNeedleTask(**t)
  return PasskeyTask(**t)


def _value_positions(settings, depths, n):
  task = _task_of(settings)
  if isinstance(task, TextNeedleTask):
    return task.marker_positions(np.asarray(depths), n) + 2
  return marker_positions(np.asarray(depths), n) + 1


def beyond_window(settings, grid) -> float:
  """Mean accuracy over the cells whose VALUE lies outside the final query's window."""
  far = []
  for li, n in enumerate(settings["lengths"]):
    value_pos = _value_positions(settings, settings["depths"], n)
    far.extend(np.asarray(grid)[value_pos <= (n - 1) - settings["window"], li].tolist())
  return float(np.mean(far)) if far else float("nan")


def summary(results) -> dict:
  """Per variant: mean accuracy per length (single key, and multi-key if run),
  beyond-window accuracy, train seconds, span-hit rows."""
  s = results["settings"]
  out = {}
  for v, runs in _variant_runs(results).items():
    g = _mean_grid(runs)
    entry = {"per_length": g.mean(axis=0).tolist(), "beyond_window": beyond_window(s, g),
             "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
             "seeds": [r["seed"] for r in runs]}
    if all("grid_multi" in r for r in runs):
      entry["multi_per_length"] = _mean_grid(runs, "grid_multi").mean(axis=0).tolist()
    out[v] = entry
  return out


def targets(results) -> list[str]:
  """The routing targets, each stated as met / missed / not measured."""
  s = results["settings"]
  summ = summary(results)
  lengths = s["lengths"]
  if s["train_len"] not in lengths:
    return ["- The training length is not on the eval grid: targets not measured."]
  li = lengths.index(s["train_len"])
  chance = 1.0 / s["task"]["num_values"]
  lines = []
  sup = [v for v in summ if v.startswith("hybrid") or v.startswith("superlinear")]
  for v in sup:
    acc = summ[v]["per_length"][li]
    lines.append(f"- `{v}` at the training length (L = {s['train_len']}): accuracy "
                 f"{acc:.2f} (target >= 0.90): **{'met' if acc >= 0.9 else 'missed'}**.")
  if "sliding" in summ:
    acc = summ["sliding"]["per_length"][li]
    lines.append(f"- `sliding` at the training length: {acc:.2f}; beyond its window "
                 f"{summ['sliding']['beyond_window']:.2f} (chance {chance:.3f}).")
  for key, r in results["runs"].items():
    st = (r.get("anchors") or {}).get(str(s["train_len"]))
    if not st:
      continue
    for layer, row in st.items():
      if not layer.startswith("layer") or row["any_head_any_span"] is None:
        continue
      hit, ch = row["any_head_any_span"], row["chance_any_head_any_span"]
      ok = ch is not None and hit >= 2 * ch
      lines.append(f"- `{key}` layer {layer[5:]}: the final query's spans contain the "
                   f"needle {_pct(hit)} of the time against {_pct(ch)} for random "
                   f"anchors (target >= 2x): **{'met' if ok else 'missed'}**.")
  for v in [x for x in summ if x in ("dense",) or x in sup]:
    beyond = [f"{n // s['train_len']}x: {summ[v]['per_length'][i]:.2f}"
              for i, n in enumerate(lengths) if n > s["train_len"]]
    if beyond:
      lines.append(f"- `{v}` beyond the training length: " + ", ".join(beyond) + ".")
  return lines


_READING_OPEN, _READING_CLOSE = "<!-- reading -->", "<!-- /reading -->"
# Marks a reading generated from the numbers (rewritten with them); a reading
# written by hand between the reading tags has no mark and is kept.
_AUTO_MARK = "<!-- generated from the numbers; a hand-written reading replaces it -->"
_OLD_AUTO_MARK = "(Written automatically from the numbers; replace with a reading.)"


def _auto_reading(results) -> str:
  """A reading stated from the numbers alone: each variant against chance
  at the training length, beyond the window, and beyond the training length."""
  s = results["settings"]
  chance = 1.0 / s["task"]["num_values"]
  lengths = s["lengths"]
  col = lengths.index(s["train_len"]) if s["train_len"] in lengths else None
  lines = [_AUTO_MARK, ""]
  for v, runs in _variant_runs(results).items():
    g = _mean_grid(runs)
    parts = []
    if col is not None:
      acc = float(g[:, col].mean())
      ratio = f"{acc / chance:.1f}x chance" if chance > 0 else ""
      parts.append(f"{acc:.2f} at the training length L = {s['train_len']} ({ratio})")
    far = beyond_window(s, g)
    if far == far:                                  # not NaN: some cell lies beyond
      parts.append(f"{far:.2f} on the needles beyond the {s['window']}-key window")
    longer = [f"{g[:, i].mean():.2f} at L = {n}" for i, n in enumerate(lengths)
              if n > s["train_len"]]
    if longer:
      parts.append("; ".join(longer))
    lines.append(f"- `{v}`: " + "; ".join(parts) + ".")
  lines.append(f"\nChance is {chance:.3f} (1 of {s['task']['num_values']} values).")
  return "\n".join(lines)


_TITLES = {
    "passkey": "Passkey needle-in-a-haystack: superlinear routing keys compared",
    "quick": "Needle in a real-text haystack: the quick main job",
    "routing": "Needle in a real-text haystack where the superlinear layer must route",
}


def write_report(results, out: str, name: str = "niah"):
  """Heatmaps `<name>_<variant>.png` and `<name>.md` from the results dict."""
  s = results["settings"]
  preset = s.get("preset", "passkey")
  text_task = s.get("task_kind", "passkey") == "text"
  lengths, depths = s["lengths"], s["depths"]
  variants = _variant_runs(results)
  for v, runs in variants.items():
    g = _mean_grid(runs)
    seeds = ",".join(str(r["seed"]) for r in runs)
    plot_heatmap(g, lengths, depths, os.path.join(out, f"{name}_{v}.png"),
                 title=f"{v}: {'real-text NIAH' if text_task else 'passkey'} accuracy "
                       f"(train L={s['train_len']}, {s['steps']} steps, seeds {seeds})")

  md_path = os.path.join(out, f"{name}.md")
  reading = None
  if os.path.exists(md_path):
    text = open(md_path).read()
    if _READING_OPEN in text and _READING_CLOSE in text:
      reading = text.split(_READING_OPEN, 1)[1].split(_READING_CLOSE, 1)[0].strip()
  if not reading or reading.startswith((_AUTO_MARK, _OLD_AUTO_MARK)):
    reading = _auto_reading(results)

  sl = s["superlinear"]
  cfg = s.get("model", {"d_model": 64, "num_layers": 2})
  L = []
  L.append(f"# {_TITLES.get(preset, _TITLES['passkey'])}\n")
  L.append(f"Generated by `python -m eval.niah {s['command_args']}` "
           f"({results.get('updated', '')}); raw numbers in `{name}.json`.")
  if preset == "passkey":
    L.append("The question: should superlinear layers route with `k` itself "
             "(`search_key=\"k\"`, as the reference) or with an accumulated key "
             "(`search_key=\"accumulated\"`: a gated, decaying causal scan of the "
             "keys, `train.model.gated_linear_scan`)?\n")
  else:
    L.append("The question: does the superlinear layer of a sliding-window + "
             "superlinear hybrid learn to route its final query to a needle far "
             "outside every window, and how does that compare with sliding window "
             "alone and with dense attention?\n")
  L.append("## Setup\n")
  t = s["task"]
  if text_task:
    L.append(f"- Task (`eval.niah.TextNeedleTask`): a window of real text "
             f"(`{t['source']}`: the training split for training, the held-out "
             f"split for evaluation), byte tokens; the needle `MARKER KEY VALUE` "
             f"at depth d (MARKER at `round(d (L - 5))`), a final `QUERY KEY` "
             f"whose next token is the VALUE; {t['num_keys']} keys and "
             f"{t['num_values']} values, special tokens outside the byte range "
             f"(chance {1 / t['num_values']:.3f}). "
             + (f"Training draws 0 to {t['max_distractors']} distractor needles (other "
                "keys, other values) per batch; " if t["max_distractors"] else
                "Training sequences hold no distractor needles; ")
             + "loss only at the answer"
             + (f" plus {s['lm_weight']} x the next-byte loss of the text"
                if s.get("lm_weight") else "") + ". Exact-match accuracy (argmax "
             "over the full vocabulary).")
  else:
    L.append(f"- Task (`eval.niah.PasskeyTask`): {t['num_filler']} filler "
             f"tokens drawn i.i.d., the needle `MARKER VALUE` at depth d "
             f"(marker at `round(d (L - 3))`), a final `QUERY` whose next token "
             f"is the VALUE; {t['num_values']} values never used in the "
             f"haystack (chance {1 / t['num_values']:.3f}); loss only at "
             "the QUERY position; exact-match accuracy (argmax over the full "
             "vocabulary).")
  L.append(f"- Model: {cfg['num_layers']} layers, d_model {cfg['d_model']}, 2 heads of "
           f"{cfg['d_model'] // 2}, SwiGLU {4 * cfg['d_model']}, RoPE. Variants: "
           + "; ".join(f"`{v}` = {', '.join(f'{k}={x}' for k, x in VARIANTS[v].items())}"
                       for v in variants) + ".")
  warm = s.get("warm") or {}
  curriculum = (f" after {warm['steps']} steps at L = {warm['len']}, batch {warm['batch']} "
                "(a length curriculum)" if warm.get("steps") else "")
  L.append(f"- Training: {s['steps']} steps, batch {s['batch_size']}, "
           f"L = {s['train_len']}{curriculum} (needle depth uniform), AdamW lr {s['lr']} "
           "(warmup, cosine to 0.1x), weight decay 0.01, clip 1.0; "
           f"seeds {s['seeds']}.")
  L.append(f"- Superlinear: `SuperlinearConfig({', '.join(f'{k}={v}' for k, v in sl.items())})`"
           f", i.e. a {s['window']}-key window; `sliding` layers use the same "
           f"{s['window']}-key window; `dense` is full causal attention.")
  if s.get("coverage"):
    c = s["coverage"]
    L.append(f"- At L = {s['train_len']} the final query's window and "
             f"{sl.get('num_spans', 2)} spans cover at most {c['keys']} of "
             f"{s['train_len']} keys ({100 * c['fraction']:.1f}%).")
  L.append(f"- Eval: lengths {lengths} x depths "
           f"{[round(100 * d) for d in depths]}%, {s['samples']} sequences per "
           "cell, the same eval set for every model"
           + (f" (held-out text)" if text_task else "") + ". Lengths above the "
           "training length test length generalisation.\n")

  L.append("## Accuracy per variant and length\n")
  L.append("Mean over depths (and over seeds; per-seed values in brackets). "
           "`beyond window` averages the cells whose needle lies outside the "
           f"final query's {s['window']}-key window.\n")
  head = "| variant | train s | " + " | ".join(f"L={n}" for n in lengths) + " | beyond window |"
  L.append(head)
  L.append("|" + "---|" * (len(lengths) + 3))
  for v, runs in variants.items():
    cells = []
    for li in range(len(lengths)):
      per_seed = [float(np.mean(np.asarray(r["grid"])[:, li])) for r in runs]
      extra = f" ({', '.join(f'{x:.2f}' for x in per_seed)})" if len(runs) > 1 else ""
      cells.append(f"{np.mean(per_seed):.2f}{extra}")
    g = _mean_grid(runs)
    secs = np.mean([r["train_seconds"] for r in runs])
    L.append(f"| `{v}` | {secs:.0f} | " + " | ".join(cells) +
             f" | {beyond_window(s, g):.2f} |")
  L.append("")
  if any("grid_multi" in r for rs in variants.values() for r in rs):
    nd = s.get("eval_distractors", 0)
    L.append(f"Multi-key (RULER style): {nd} distractor needles with other keys and "
             "values in every sequence; mean accuracy over depths.\n")
    L.append("| variant | " + " | ".join(f"L={n}" for n in lengths) + " |")
    L.append("|" + "---|" * (len(lengths) + 1))
    for v, runs in variants.items():
      if all("grid_multi" in r for r in runs):
        m = _mean_grid(runs, "grid_multi").mean(axis=0)
        L.append(f"| `{v}` | " + " | ".join(f"{x:.2f}" for x in m) + " |")
    L.append("")
  L.append("Final training loss / accuracy (last logging window): " + "; ".join(
      f"`{v}` " + ", ".join(f"{r['history'][-1][1]:.3f} / {r['history'][-1][2]:.2f}"
                            for r in runs) for v, runs in variants.items()) + ".\n")
  if preset == "routing":
    L.append("## Targets\n")
    L.extend(targets(results))
    L.append("")

  L.append("## Heatmaps\n")
  for v in variants:
    L.append(f"![{v}]({name}_{v}.png)\n")

  anchor_runs = [(k, r) for k, r in results["runs"].items() if r.get("anchors")]
  # `window hit` says something only where random anchors do not reach the
  # needle from the window anyway (chance below 100%).
  window_stats = [st for _, r in anchor_runs for per_len in r["anchors"].values()
                  for st in per_len.values() if isinstance(st, dict) and "window_any" in st]
  has_window = any(st.get("chance_window_any") is not None
                   and st["chance_window_any"] < 0.995 for st in window_stats)
  if anchor_runs:
    L.append("## Do the selected spans contain the needle?\n")
    L.append("For each trained superlinear model: the selected anchors "
             "(`attn.superlinear_attention_with_anchors` on each superlinear "
             "layer's input, recomputed from the trained weights), over "
             f"{s['anchor_samples']} needles per length uniform in depth; counted "
             "over the needles outside the final query's window. `hit` = some "
             "head of the final query has a selected span containing the VALUE "
             "position; `top-1` = the best anchor's span does; "
             + ("`window hit` = some position of the final query's window does; "
                if has_window else "")
             + "`chance`: the same rate if every head picked its spans uniformly "
             "among the valid anchors; answer accuracy split by `hit`."
             + (" (No `window hit` column: at these lengths some position of the "
                "final query's window reaches the needle with random anchors as well, "
                "chance 100%, so it would say nothing.)" if window_stats and not has_window
                else "") + "\n")
    L.append("| run | L | layer | outside | hit | top-1 | chance | "
             + ("window hit | window chance | " if has_window else "")
             + "acc if hit | acc if miss |")
    L.append("|" + "---|" * (11 if has_window else 9))
    for key, r in anchor_runs:
      for n, per_len in r["anchors"].items():
        for layer, st in per_len.items():
          if not layer.startswith("layer"):
            continue
          L.append(f"| `{key}` | {n} | {layer[5:]} | {per_len['n_outside']} | "
                   f"{_pct(st['any_head_any_span'])} | {_pct(st['any_head_top1'])} | "
                   f"{_pct(st['chance_any_head_any_span'])} | "
                   + (f"{_pct(st.get('window_any'))} | {_pct(st.get('chance_window_any'))} | "
                      if has_window else "") +
                   f"{_pct(st['correct_given_hit'])} | {_pct(st['correct_given_miss'])} |")
    L.append("")

  L.append("## Reading\n")
  L.append(_READING_OPEN)
  L.append(reading)
  L.append(_READING_CLOSE)
  L.append("")
  with open(md_path, "w") as f:
    f.write("\n".join(L))
