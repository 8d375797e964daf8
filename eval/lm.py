"""Held-out language-modelling quality of trained runs, by context position.

    python -m eval.lm --workdir DIR [--workdir DIR2 ...] [--out OUT]
                      [--config FILE ...] [--lengths N ...] [--windows N]

For each run directory (written by `python -m train`): rebuilds the model from
`config.json`, restores the latest checkpoint, and scores fixed held-out
windows (`train.data.heldout_windows`, the run's own corpus and split) at the
trained length and beyond it (default 1x, 2x, 4x `seq_len`). Reports held-out
bits per byte overall and per context-position bucket (`[0, 128)`,
`[128, 512)`, `[512, 2048)`, ... up to each length; a byte at position `t` is
predicted from `t + 1` bytes of context), so the value of long context shows.

Writes `OUT/lm.json` (entries keyed by run name, merged with those already
there), `OUT/lm.png`, prints a table, and refreshes `OUT/results.md`
(`eval.results`). `OUT` defaults to the (first) workdir.

With `--config FILE` (one per `--workdir`, in the same order) a run is first
trained to completion, exactly as `python -m train --config FILE --set
workdir=DIR [--resume]` would (a finished run is not retrained), so one
command regenerates the whole result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

from eval import progress
from eval import results as results_lib
from train import generate

__all__ = ["evaluate_run", "load_run_config", "plot", "main"]


load_run_config = generate.load_run_config  # the config a run was trained with


def evaluate_run(workdir: str, *, lengths=None, windows: int = 16,
                 tokens_per_batch: int = 32768) -> dict:
  """Held-out bits per byte of a run's latest checkpoint.

  Args:
    workdir: a training run directory.
    lengths: context lengths to score (default `[L, 2L, 4L]`, L = seq_len).
    windows: held-out windows per length (evenly spaced, fixed).
    tokens_per_batch: forward batch is `max(1, tokens_per_batch // length)`.

  Returns a dict: `run`, `step`, `seq_len`, `config` (model/data summary),
  and `lengths`: one entry per length with `bits_per_byte` (all positions)
  and `buckets` (`train.evaluate.bucket_bits`).
  """
  import jax
  import jax.numpy as jnp
  from train import data as data_lib
  from train import evaluate as ev
  from train.config import to_dict

  config, trainer, step, state = generate.restore_latest(workdir)
  nll_fn = ev.make_nll_fn(trainer.graphdef)
  params, rest = state["params"], trainer.init_rest()
  held = data_lib.corpus(config, "heldout")
  lengths = lengths or [config.seq_len, 2 * config.seq_len, 4 * config.seq_len]
  per_length = []
  for length in lengths:
    rows = data_lib.heldout_windows(held, length + 1, windows)
    size = max(1, tokens_per_batch // length)
    nll = np.concatenate([np.asarray(jax.device_get(nll_fn(params, rest, jnp.asarray(rows[i:i + size]))))
                          for i in range(0, len(rows), size)])
    per_length.append({
        "length": int(length), "windows": int(windows),
        "bits_per_byte": ev.bits_per_byte(nll.sum(), nll.size),
        "buckets": ev.bucket_bits(nll, ev.bucket_edges(length))})
  m = config.model
  held_works = None
  if config.data.source != "synthetic":
    held_works = data_lib.split_works(w for w, _ in data_lib.documents(config.data.source))[1]
  return {
      "heldout_works": held_works,
      "run": os.path.basename(os.path.abspath(workdir)), "workdir": workdir, "step": int(step),
      "seq_len": config.seq_len, "seed": config.seed,
      "data": to_dict(config.data), "layer_types": list(m.layer_types),
      "model": {k: v for k, v in to_dict(m).items()
                if k in ("d_model", "num_layers", "num_heads", "head_dim", "window", "ppa_p",
                         "search_key", "superlinear")},
      "lengths": per_length}


def train_run(config_path: str, workdir: str) -> str:
  """Trains (or finishes) `workdir` with the config file; returns the command."""
  from train import loop
  from train.checkpoint import Checkpointer
  from train.config import apply_overrides, load_config

  config = apply_overrides(load_config(config_path), [f"workdir={workdir}"])
  ck = Checkpointer(os.path.abspath(workdir), keep=config.keep_checkpoints, async_save=False)
  steps = ck.all_steps()
  ck.close()
  if config.steps not in steps:
    result = loop.train(config, resume=bool(steps))
    if result.status != "done":
      raise SystemExit(f"training {workdir} stopped: {result.message}")
  return f"python -m train --config {config_path} --set workdir={workdir}"


def plot(results: dict, path: str):
  """Bits per byte per position bucket, one panel line per (run, length)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for ri, (name, run) in enumerate(sorted(results["runs"].items())):
    color = f"C{ri % 10}"
    for li, entry in enumerate(run["lengths"]):
      b = entry["buckets"]
      x = [np.sqrt(max(1, e["lo"]) * e["hi"]) for e in b]
      ax.plot(x, [e["bits_per_byte"] for e in b], marker="o", color=color,
              linestyle=["-", "--", ":", "-."][li % 4], alpha=1.0 - 0.2 * li,
              label=f"{name} @ L={entry['length']}")
    ax.axvline(run["seq_len"], color=color, linewidth=0.6, alpha=0.5)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context position of the predicted byte (bucket, log scale); "
                "vertical lines: trained length")
  ax.set_ylabel("held-out bits per byte")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  ap = argparse.ArgumentParser(prog="python -m eval.lm", description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", action="append", required=True,
                  help="a `python -m train` run directory (repeatable)")
  ap.add_argument("--out", default=None, help="output directory (default: the first workdir)")
  ap.add_argument("--lengths", nargs="+", type=int, default=None,
                  help="context lengths (default: 1x, 2x, 4x the trained seq_len)")
  ap.add_argument("--windows", type=int, default=16, help="held-out windows per length")
  ap.add_argument("--config", action="append", default=[],
                  help="train the matching --workdir with this config first (repeatable)")
  args = ap.parse_args(argv)
  if args.config and len(args.config) != len(args.workdir):
    ap.error("give one --config per --workdir (or none)")
  out = args.out or args.workdir[0]
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, "lm.json")
  results = {"runs": {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      results = json.load(f)
  bar = progress.Progress([1.0] * len(args.workdir))   # runs of unknown, similar cost
  for i, workdir in enumerate(args.workdir):
    train_command = None
    if args.config:
      bar.update(i, 0.0, f"{workdir}: training")
      train_command = train_run(args.config[i], workdir)
    bar.update(i, 0.5 if args.config else 0.0, f"{workdir}: evaluating")
    t0 = time.time()
    run = evaluate_run(workdir, lengths=args.lengths, windows=args.windows)
    if train_command:
      run["train_command"] = f"`{train_command}`"
    run["eval_seconds"] = round(time.time() - t0, 1)
    run["command"] = "python -m eval.lm " + " ".join(argv)
    run["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["runs"][run["run"]] = run
    bar.finish(i, f"[lm] {run['run']} step {run['step']}: " + "; ".join(
        f"L={e['length']}: {e['bits_per_byte']:.3f} bpb" for e in run["lengths"]))
  with open(json_path + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
  os.replace(json_path + ".tmp", json_path)
  plot(results, os.path.join(out, "lm.png"))
  print("\n".join(results_lib.lm_table(results)))
  results_lib.update(out)


if __name__ == "__main__":
  main()
