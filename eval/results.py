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

_OPEN, _CLOSE = "<!-- reading -->", "<!-- /reading -->"
_PLACEHOLDER = "(No reading yet: write one from the tables above.)"


def _load(out, name):
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _lm_section(lm) -> list[str]:
  from eval import lm as lm_lib

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
  L.extend(lm_lib.table(lm))
  L.append("\n![held-out bits per byte by position](lm.png)\n")
  return L


def _niah_section(niah, name, title="## Needle in a haystack where the route matters") -> list[str]:
  from eval import niah as niah_lib

  L = [title + "\n"]
  if not niah:
    return L + ["Not run yet: `python -m eval.niah --preset routing`.\n"]
  s = niah["settings"]
  L.append(f"`python -m eval.niah {s['command_args']}` ({niah.get('updated', '')}); "
           f"seeds {s['seeds']}; full report with heatmaps and the span analysis: "
           f"[{name}.md]({name}.md).\n")
  lengths = s["lengths"]
  summ = niah_lib.summary(niah)
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
  L.extend(niah_lib.targets(niah))
  L.append("")
  for v in summ:
    L.append(f"![{v}]({name}_{v}.png)")
  L.append("")
  return L


def _ppa_section(sweep) -> list[str]:
  from eval import ppa_sweep

  L = ["## The PPA S-curve\n"]
  if not sweep:
    return L + ["Not run yet: `python -m eval.ppa_sweep`.\n"]
  return L + ppa_sweep.markdown(sweep) + ["", "![PPA S-curve](ppa_sweep.png)", ""]


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
