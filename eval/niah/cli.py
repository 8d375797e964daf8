"""Command line of `python -m eval.niah` (presets, the run loop, the progress bar)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

from eval import progress as progress_lib
from eval.niah.evaluate import evaluate_grid
from eval.niah.report import _atomic_json, format_grid, summary, targets, write_report
from eval.niah.spans import coverage, needle_anchor_hits
from eval.niah.tasks import PasskeyTask, TextNeedleTask
from eval.niah.training import SUPERLINEAR_KW, VARIANTS, model_config, train_model

__all__ = ["PRESETS", "main", "run_cost"]

_eprint = progress_lib.eprint
_fmt_s = progress_lib.fmt_seconds

# Each preset fills the flags the command line leaves unset.
PRESETS = {
    "passkey": dict(
        task_kind="passkey", task={}, name="niah",
        variants=["superlinear_k", "superlinear_acc", "dense", "sliding"], seeds=[0, 1],
        steps=300, train_len=128, batch_size=32, lr=3e-3, lengths=[128, 256, 512, 1024],
        depths=11, samples=32, anchor_samples=64, superlinear=SUPERLINEAR_KW,
        eval_distractors=0, lm_weight=0.0, d_model=64, warm_steps=0, warm_len=0,
        warm_batch=0),
    "quick": dict(
        task_kind="text", task=dict(num_keys=16, num_values=16, max_distractors=0),
        name="niah", variants=["hybrid_acc", "sliding"], seeds=[0], steps=300, train_len=256,
        batch_size=32, lr=3e-3, lengths=[256, 512, 1024], depths=6, samples=16,
        anchor_samples=32, superlinear=SUPERLINEAR_KW, eval_distractors=0,
        lm_weight=0.0, d_model=64, warm_steps=0, warm_len=0, warm_batch=0),
    "routing": dict(
        task_kind="text", task=dict(num_keys=16, num_values=16, max_distractors=2),
        name="niah_routing", variants=["hybrid_acc", "hybrid_acc_rope", "hybrid", "sliding",
                                       "dense"], seeds=[0],
        steps=500, train_len=1024, batch_size=16, lr=3e-3, lengths=[1024, 2048, 4096],
        depths=6, samples=16, anchor_samples=48, superlinear={}, eval_distractors=3,
        lm_weight=0.0, d_model=64, warm_steps=250, warm_len=256, warm_batch=32),
}


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.niah",
                               description="Needle-in-a-haystack: train small models, "
                                           "evaluate a depth x length grid, write a report.")
  ap.add_argument("--preset", choices=list(PRESETS), default="passkey",
                  help="defaults for every flag below (quick = the README's main job)")
  ap.add_argument("--out", default=None, help="output directory (default docs, runs/ for quick)")
  ap.add_argument("--name", default=None, help="file name prefix of the outputs")
  ap.add_argument("--steps", type=int)
  ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
  ap.add_argument("--seeds", nargs="+", type=int)
  ap.add_argument("--lengths", nargs="+", type=int)
  ap.add_argument("--depths", type=int, help="number of depths, evenly spaced over 0..100%%")
  ap.add_argument("--samples", type=int, help="eval sequences per cell")
  ap.add_argument("--train-len", type=int)
  ap.add_argument("--batch-size", type=int)
  ap.add_argument("--lr", type=float)
  ap.add_argument("--d-model", type=int, help="model width (heads of d_model / 2)")
  ap.add_argument("--anchor-samples", type=int,
                  help="needles per length for the span analysis (0 = skip)")
  ap.add_argument("--warm-steps", type=int,
                  help="length curriculum: the first N steps at --warm-len (0 = none)")
  ap.add_argument("--warm-len", type=int)
  ap.add_argument("--warm-batch", type=int)
  ap.add_argument("--eval-distractors", type=int,
                  help="distractor needles of the multi-key eval grid (0 = skip it)")
  ap.add_argument("--fresh", action="store_true",
                  help="ignore an existing <name>.json instead of resuming it")
  ap.add_argument("--report-only", action="store_true",
                  help="only rewrite <name>.md and the heatmaps from <name>.json")
  args = ap.parse_args(argv)
  preset = PRESETS[args.preset]
  for key, value in preset.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.out is None:
    args.out = "runs/niah_quick" if args.preset == "quick" else "docs"
  return args


# Eval and span analysis cost about as much as 20% of training.
_EVAL_SHARE = 0.2


def _keys_per_query(kind: str, seq_len: int, config) -> float:
  """Keys a query attends (mean over positions) in a layer of `kind`: the
  attention part of the cost model below."""
  import numpy as np

  from attn import masks

  w = min(config.window, seq_len)
  if kind == "dense":
    return (seq_len + 1) / 2
  if kind == "sliding":
    return w
  if kind == "ppa":
    return w + float(np.mean(np.arange(seq_len, dtype=np.float64) ** config.ppa_p))
  sl = config.superlinear
  searched = len(masks.superlinear_stripe_table(seq_len, sl))       # anchors scored
  return searched + coverage(seq_len, dataclasses.asdict(sl))["keys"]   # window + spans


def run_cost(config, *, steps: int, batch_size: int, seq_len: int, warm_steps: int = 0,
             warm_len: int = 0, warm_batch: int = 0) -> float:
  """A cost model of one (variant, seed) run, for the ETA only: tokens
  trained x per-token work (projections and MLP `~12 d^2`, attention `~4 d`
  per key attended), plus `_EVAL_SHARE` for the evaluation. A model, not a
  measurement; the progress bar calibrates it with measured times."""
  d = config.d_model

  def per_step(n, b):
    attn_keys = sum(_keys_per_query(kind, n, config) for kind in config.layer_types)
    return b * n * (12 * d * d * config.num_layers + 4 * d * attn_keys)

  total = ((steps - warm_steps) * per_step(seq_len, batch_size)
           + (warm_steps * per_step(warm_len, warm_batch) if warm_steps else 0))
  return (1.0 + _EVAL_SHARE) * total


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  from attn import SuperlinearConfig

  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, f"{args.name}.json")
  text_task = args.task_kind == "text"
  task = TextNeedleTask(**args.task) if text_task else PasskeyTask(**args.task)
  depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
  sl = SuperlinearConfig(**args.superlinear)
  settings = dict(
      preset=args.preset, task_kind=args.task_kind,
      steps=args.steps, seeds=args.seeds, lengths=args.lengths, depths=depths,
      samples=args.samples, train_len=args.train_len, batch_size=args.batch_size,
      lr=args.lr, anchor_samples=args.anchor_samples, task=dataclasses.asdict(task),
      superlinear=dataclasses.asdict(sl), window=sl.window,
      eval_distractors=args.eval_distractors if text_task else 0,
      lm_weight=args.lm_weight, model={"d_model": args.d_model, "num_layers": 2},
      warm=dict(steps=args.warm_steps, len=args.warm_len, batch=args.warm_batch),
      coverage=coverage(args.train_len, dataclasses.asdict(sl)),
      command_args=" ".join(argv))

  fixed = ("steps", "lengths", "depths", "samples", "train_len", "batch_size", "lr",
           "task", "superlinear", "eval_distractors", "lm_weight", "model", "warm")
  results = None
  if os.path.exists(json_path) and not args.fresh:
    with open(json_path) as f:
      results = json.load(f)
    old = results["settings"]
    if args.report_only:
      pass
    elif {k: old.get(k) for k in fixed} != {k: settings[k] for k in fixed}:
      raise SystemExit(f"{json_path} holds results for other settings; pass --fresh "
                       "to overwrite it or --out elsewhere.")
    else:
      results["settings"]["seeds"] = sorted(set(old["seeds"]) | set(args.seeds))
      results["settings"]["command_args"] = settings["command_args"]
  if args.report_only:
    if results is None:
      raise SystemExit(f"no {json_path} to report from")
    write_report(results, args.out, args.name)
    _refresh_results(args.out)
    return
  if results is None:
    results = {"settings": settings, "runs": {}}

  plan = [(v, s) for s in args.seeds for v in args.variants
          if f"{v}/seed{s}" not in results["runs"]]
  _eprint(f"[niah] {len(plan)} runs to do ({len(results['runs'])} already in {json_path})")

  def config_of(variant):
    return model_config(variant, task, superlinear=sl, d_model=args.d_model,
                        num_heads=2, num_kv_heads=2, head_dim=args.d_model // 2,
                        mlp_dim=4 * args.d_model)

  # The ETA weighs each run by its cost model and calibrates it per variant.
  bar = progress_lib.Progress(
      [run_cost(config_of(v), steps=args.steps, batch_size=args.batch_size,
                seq_len=args.train_len, warm_steps=args.warm_steps, warm_len=args.warm_len,
                warm_batch=args.warm_batch) for v, _ in plan],
      kinds=[v for v, _ in plan])
  train_share = 1.0 / (1.0 + _EVAL_SHARE)
  t_start = time.time()
  for n_done, (variant, seed) in enumerate(plan):
    key = f"{variant}/seed{seed}"
    config = config_of(variant)
    t0 = time.time()

    def progress(step, loss, acc, key=key, n_done=n_done):
      bar.update(n_done, train_share * step / args.steps,
                 f"{key} step {step}/{args.steps} loss {loss:.3f} acc {acc:.2f}")

    model, history = train_model(config, task, steps=args.steps,
                                 batch_size=args.batch_size, seq_len=args.train_len,
                                 lr=args.lr, seed=seed, lm_weight=args.lm_weight,
                                 warm_steps=args.warm_steps, warm_len=args.warm_len,
                                 warm_batch=args.warm_batch,
                                 log_every=max(1, min(25, args.steps // 20)),
                                 progress=progress)
    t_train = time.time() - t0
    bar.update(n_done, train_share, f"{key} trained in {_fmt_s(t_train)}; evaluating")
    grid = evaluate_grid(model, task, lengths=args.lengths, depths=depths,
                         samples=args.samples)
    run = dict(variant=variant, seed=seed, steps=args.steps,
               train_seconds=t_train, history=history, grid=grid.tolist(),
               mean_per_length=grid.mean(axis=0).tolist())
    if text_task and args.eval_distractors:
      multi = evaluate_grid(model, task, lengths=args.lengths, depths=depths,
                            samples=args.samples, distractors=args.eval_distractors)
      run["grid_multi"] = multi.tolist()
    if "superlinear" in config.layer_types and args.anchor_samples > 0:
      run["anchors"] = needle_anchor_hits(model, task, lengths=args.lengths,
                                          samples=args.anchor_samples)
    run["eval_seconds"] = time.time() - t0 - t_train
    results["runs"][key] = run
    results["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    _atomic_json(results, json_path)
    write_report(results, args.out, args.name)
    _refresh_results(args.out)
    bar.finish(n_done, f"{key} done")
    _eprint(f"[niah] {key}: accuracy (rows: needle depth %, columns: length)\n"
            + format_grid(grid, args.lengths, depths))
  summ = summary(results)
  _eprint(f"[niah] all done in {_fmt_s(time.time() - t_start)}; mean accuracy per length "
          f"(chance {1 / task.num_values:.3f}):")
  _eprint("  variant          " + "".join(f"{f'L={n}':>9}" for n in args.lengths)
          + "  beyond window")
  for v, e in summ.items():
    _eprint(f"  {v:<16} " + "".join(f"{x:9.2f}" for x in e["per_length"])
            + f"  {e['beyond_window']:.2f}")
  if args.preset == "routing":
    _eprint("\n".join(targets(results)))
  _eprint(f"[niah] report: {os.path.join(args.out, args.name + '.md')}, heatmaps "
          f"{os.path.join(args.out, args.name + '_<variant>.png')}")
  _refresh_results(args.out)


def _refresh_results(out: str):
  from eval import results as results_lib
  results_lib.update(out)

