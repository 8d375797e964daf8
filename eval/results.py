"""`docs/results.md`: the language-modelling, NIAH and PPA S-curve results.

    python -m eval.results [--out docs]

Assembles `OUT/results.md` from the JSON files the experiment commands write
next to it (`lm.json` from `python -m eval.lm`, `niah_routing.json` from
`python -m eval.niah --preset routing`, and `niah_routing_<x>.json` from
the same command run with `--name niah_routing_<x>`, `ppa_sweep.json` from
`python -m eval.ppa_sweep`), with the commands, seeds and dates recorded in
them. Those commands call `update(out)` when they finish, which rewrites
`OUT/results.md` if it already exists (this command creates it). The text
between `<!-- reading -->` and `<!-- /reading -->` is kept (hand-written).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from eval.niah import report as niah_report

_OPEN, _CLOSE = "<!-- reading -->", "<!-- /reading -->"
_PLACEHOLDER = "(No reading yet: write one from the tables above.)"


# ------------------------------------------------------------ tables


def lm_table(results: dict) -> list[str]:
  """Markdown rows: run, step, length, overall, then each bucket."""
  lines = ["| run | layers | step | eval length | all positions | by position bucket |",
           "|---|---|---|---|---|---|"]
  for name, run in sorted(results["runs"].items()):
    for entry in run["lengths"]:
      buckets = ", ".join(f"{e['lo']}-{e['hi']}: {e['bits_per_byte']:.3f}"
                          for e in entry["buckets"])
      lines.append(f"| `{name}` | {'/'.join(run['layer_types'])} | {run['step']} | "
                   f"{entry['length']}{' (trained)' if entry['length'] == run['seq_len'] else ''} "
                   f"| {entry['bits_per_byte']:.3f} | {buckets} |")
  return lines


def _agg(runs, key):
  vals = [r[key] for r in runs]
  return float(np.mean(vals)), vals


def ppa_rows(sweep) -> list[dict]:
  """One row per setting: name, p (or None), cost, mean metrics, per-seed values."""
  out = []
  names = sorted(sweep["settings"]["configs"],
                 key=lambda n: (0, float(n[2:])) if n.startswith("p=") else (1, n != "superlinear"))
  for name in names:
    runs = [r for r in sweep["runs"].values() if r["name"] == name]
    if not runs:
      continue
    bpb, bpb_s = _agg(runs, "heldout_bits_per_byte")
    acc, acc_s = _agg(runs, "niah_accuracy")
    out.append({"name": name, "p": float(name[2:]) if name.startswith("p=") else None,
                "fraction": sweep["cost"][name]["fraction"],
                "exact": sweep["cost"][name]["exact"],
                "op_ms": 1e3 * sweep["cost"][name]["op_seconds"],
                "bpb": bpb, "bpb_seeds": bpb_s, "acc": acc, "acc_seeds": acc_s,
                "train_s": float(np.mean([r["train_seconds"] for r in runs]))})
  return out


def ppa_markdown(sweep) -> list[str]:
  s = sweep["settings"]
  L = [f"`python -m eval.ppa_sweep {s['command_args']}` ({sweep.get('updated', '')}); "
       f"seeds {s['seeds']}, {s['steps']} steps each, batch {s['batch_size']}, "
       f"L = {s['seq_len']}"
       + (f" after {s['warm_steps']} steps at L = {s['warm_len']}, batch {s['warm_batch']}"
          if s.get("warm_steps") else "")
       + f", window {s['window']}, {s['num_layers']} layers of d_model "
       f"{s['d_model']}, trained with `implementation={s.get('train_implementation')!r}`; "
       f"every model trains on the real-text NIAH task plus "
       f"{s['lm_weight']} x the next-byte loss. `p=1` keeps every causal key: it is the "
       "dense reference. `superlinear`: every layer, accumulated search key, "
       f"`sw_index={s['sw_index']}`. Held-out bits per byte over "
       f"{s['eval_windows']} plain-text windows; NIAH accuracy over "
       f"{s['niah_samples']} held-out needles (chance "
       f"{1 / s['task']['num_values']:.3f}). Device: {sweep.get('device', '?')}.\n",
       "| attention | attended keys | op forward ms | held-out bits/byte | NIAH accuracy | train s |",
       "|---|---|---|---|---|---|"]
  for r in ppa_rows(sweep):
    frac = f"{100 * r['fraction']:.1f}%" + ("" if r["exact"] else " (at most)")
    L.append(f"| `{r['name']}` | {frac} | {r['op_ms']:.2f} | {r['bpb']:.3f} "
             f"({', '.join(f'{x:.3f}' for x in r['bpb_seeds'])}) | {r['acc']:.2f} "
             f"({', '.join(f'{x:.2f}' for x in r['acc_seeds'])}) | {r['train_s']:.0f} |")
  return L


# ------------------------------------------------------------ the page


def _load(out, name):
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _lm_section(lm) -> list[str]:
  L = ["## Language modelling on real text\n"]
  if not lm or not lm.get("runs"):
    return L + ["Not run yet: `python -m eval.lm --config ... --workdir ...`.\n"]
  runs = lm["runs"]
  for name, run in sorted(runs.items()):
    trained = (f"trained by it as {run['train_command']} would" if run.get("train_command")
               else "trained separately")
    L.append(f"- `{name}`: `{run['command']}` ({trained}; scored {run['date']}); "
             f"seed {run['seed']}, data "
             f"`{run['data']['source']}` (max_bytes {run['data']['max_bytes']}), "
             f"layers {'/'.join(run['layer_types'])}, step {run['step']}, "
             f"{run['lengths'][0]['windows']} held-out windows per length.")
  held = {tuple(r["heldout_works"]) for r in runs.values() if r.get("heldout_works")}
  for works in held:
    L.append(f"- Held-out split ({len(works)} works, `train.data.split_works`): "
             + ", ".join(f"`{w}`" for w in works) + ".")
  L.append("")
  L.extend(lm_table(lm))
  L.append("\n![held-out bits per byte by position](lm.png)\n")
  return L


def _niah_section(niah, name, title="## Needle in a haystack where the route matters") -> list[str]:
  L = [title + "\n"]
  if not niah:
    return L + ["Not run yet: `python -m eval.niah --preset routing`.\n"]
  s = niah["settings"]
  L.append(f"`python -m eval.niah {s['command_args']}` ({niah.get('updated', '')}); "
           f"seeds {s['seeds']}; full report with heatmaps and the span analysis: "
           f"[{name}.md]({name}.md).\n")
  lengths = s["lengths"]
  summ = niah_report.summary(niah)
  L.append("| variant | " + " | ".join(f"L={n}" for n in lengths) + " | beyond window |"
           + (" multi-key " + ", ".join(f"L={n}" for n in lengths) + " |"
              if any("multi_per_length" in e for e in summ.values()) else ""))
  multi = any("multi_per_length" in e for e in summ.values())
  L.append("|" + "---|" * (len(lengths) + 2 + (1 if multi else 0)))
  for v, e in summ.items():
    row = f"| `{v}` | " + " | ".join(f"{x:.2f}" for x in e["per_length"]) + \
        f" | {e['beyond_window']:.2f} |"
    if multi:
      row += " " + ", ".join(f"{x:.2f}" for x in e.get("multi_per_length", [])) + " |"
    L.append(row)
  L.append("")
  L.append("Targets:\n")
  L.extend(niah_report.targets(niah))
  L.append("")
  for v in summ:
    L.append(f"![{v}]({name}_{v}.png)")
  L.append("")
  return L


def _ppa_section(sweep) -> list[str]:

  L = ["## The PPA S-curve\n"]
  if not sweep:
    return L + ["Not run yet: `python -m eval.ppa_sweep`.\n"]
  return L + ppa_markdown(sweep) + ["", "![PPA S-curve](ppa_sweep.png)", ""]


def render(out: str, reading: str | None = None) -> str:
  L = ["# Results\n",
       "Written by `python -m eval.results` from the JSON files in this directory; "
       "every experiment command below rewrites it when it finishes. Numbers come "
       "from small models on a CPU unless a section says otherwise.\n"]
  L += _lm_section(_load(out, "lm.json"))
  L += _niah_section(_load(out, "niah_routing.json"), "niah_routing")
  extra = sorted(f[:-5] for f in os.listdir(out)
                 if f.startswith("niah_routing_") and f.endswith(".json"))
  for name in extra:   # the same command with other settings (--name niah_routing_<x>)
    L += _niah_section(_load(out, name + ".json"), name,
                       title=f"### The same task, other settings: `{name}`")
  L += _ppa_section(_load(out, "ppa_sweep.json"))
  L += ["## Reading\n", _OPEN, reading or _PLACEHOLDER, _CLOSE, ""]
  return "\n".join(L)


def write(out: str):
  path = os.path.join(out, "results.md")
  reading = None
  if os.path.exists(path):
    text = open(path).read()
    if _OPEN in text and _CLOSE in text:
      reading = text.split(_OPEN, 1)[1].split(_CLOSE, 1)[0].strip()
  with open(path + ".tmp", "w") as f:
    f.write(render(out, reading))
  os.replace(path + ".tmp", path)
  return path


def update(out: str):
  """Rewrite `out/results.md` if it exists (the experiment commands call this)."""
  if os.path.exists(os.path.join(out, "results.md")):
    write(out)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m eval.results", description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="docs")
  args = ap.parse_args(argv)
  print(write(args.out))


if __name__ == "__main__":
  main()
