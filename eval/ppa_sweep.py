"""The PPA S-curve: quality against p and against the attended fraction of keys.

    python -m eval.ppa_sweep [--out docs] [--scale] [--seeds S ...] [--steps N] ...

Trains the same small model once per (attention, seed) with equal steps:
PPA with `p` in {0, 0.125, ..., 1} (p = 0 is the sliding window; p = 1 keeps
every causal key, so the `p=1` model is the dense reference) plus
`superlinear` (every layer, accumulated content-addressed search key) for
reference.
Every model trains on the real-text NIAH task (`eval.niah.TextNeedleTask`,
single needle) with the next-byte loss of the text added (`lm_weight`), so
one model gives both quality measures:

- held-out bits per byte: next-byte NLL over fixed held-out windows of plain
  text (`train.data.heldout_windows`) at the training length;
- NIAH accuracy: exact match over held-out haystacks, needle depths spread
  over 0..100%, at the training length.

Cost beside it: the attended fraction of the causal keys (PPA: the kept
entries of `attn.ppa_mask` over the causal count; superlinear: at most the
window plus `num_spans` full spans per query, an upper bound), and the
measured forward time of the attention op alone on `[1, L, heads, head_dim]`
(median of repeats, `implementation="xla"`).

Writes `OUT/ppa_sweep.json` (resumable: finished runs are kept),
`OUT/ppa_sweep.png`, prints the table, and refreshes `OUT/results.md`.
The CPU default (L = 512, window 16: 97% of a late query's keys lie beyond
the window; 3 seeds; a length curriculum from L = 128) is sized to finish on
a 2-core CPU in under 30 minutes; `--scale` is a preset for an accelerator
(L = 4096, window 64, a wider and deeper model, more steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

from eval import progress
from eval import results as results_lib

__all__ = ["PRESETS", "attended_fraction", "plot", "main"]

P_VALUES = [i / 8 for i in range(9)]

# warm_*: a length curriculum (the first warm_steps of the steps at warm_len,
# batch warm_batch); without it no model learns the NIAH at L = 512 within
# the CPU budget. train_implementation: the attn implementation the models
# train with ("reference" = masked dense attention, the same values as the
# sub-quadratic path and the fastest on a CPU at L = 512; cost is measured
# separately on the "xla" op).
PRESETS = {
    "cpu": dict(seq_len=512, window=16, d_model=64, num_layers=2, steps=240, batch_size=16,
                warm_steps=120, warm_len=128, warm_batch=32, lr=3e-3, seeds=[0, 1, 2],
                lm_weight=0.5, eval_windows=32, niah_samples=64, sw_index=3,
                train_implementation="reference"),
    "scale": dict(seq_len=4096, window=64, d_model=256, num_layers=4, steps=3000,
                  batch_size=32, warm_steps=600, warm_len=512, warm_batch=128, lr=1e-3,
                  seeds=[0, 1, 2], lm_weight=0.5, eval_windows=64, niah_samples=256,
                  sw_index=7, train_implementation="xla"),
}


def configs(p_values=P_VALUES) -> list[str]:
  """Names of the swept attention settings: `p=<p>`, then superlinear.

  No separate dense run: p = 1 keeps every causal key, so the `p=1` model is
  the dense reference (the same mask, `attn.ppa_mask(L, p=1) ==
  attn.causal_mask(L)`, asserted in tests/test_masks.py).
  """
  return [f"p={p:g}" for p in p_values] + ["superlinear"]


def attended_fraction(name: str, seq_len: int, window: int, superlinear) -> dict:
  """Keys attended per query, summed over a causal `seq_len` sequence.

  Returns `keys` (total attended (query, key) pairs), `fraction` (over the
  causal count `L (L + 1) / 2`) and `exact` (False for superlinear, whose
  count is an upper bound: window plus `num_spans` full spans per query).
  """
  import attn
  from attn import masks

  causal = seq_len * (seq_len + 1) // 2
  if name == "dense":
    return {"keys": causal, "fraction": 1.0, "exact": True}
  if name.startswith("p="):
    keys = int(attn.ppa_mask(seq_len, p=float(name[2:]), window=window).sum())
    return {"keys": keys, "fraction": keys / causal, "exact": True}
  if name == "superlinear":
    t = np.arange(1, seq_len + 1)
    spans = masks.superlinear_span_table(seq_len, superlinear)[t]
    per_query = np.minimum(t, superlinear.window
                           + superlinear.num_spans * (spans[:, 0] + spans[:, 1] + 1))
    keys = int(per_query.sum())
    return {"keys": keys, "fraction": keys / causal, "exact": False}
  raise ValueError(f"unknown setting {name!r}")


def model_config(name: str, task, s: dict):
  from attn import SuperlinearConfig
  from train.model import ModelConfig

  d = s["d_model"]
  kw = dict(vocab_size=task.vocab_size, d_model=d, num_layers=s["num_layers"],
            num_heads=2, num_kv_heads=2, head_dim=d // 2, mlp_dim=4 * d,
            window=s["window"], superlinear=SuperlinearConfig(sw_index=s["sw_index"]))
  if name.startswith("p="):
    kw.update(attention="ppa", ppa_p=float(name[2:]))
  elif name == "superlinear":
    kw.update(attention="superlinear", search_key="accumulated")
  else:
    kw.update(attention=name)
  kw["attn_implementation"] = s.get("train_implementation")
  return ModelConfig(**kw)


def op_seconds(name: str, s: dict, repeats: int = 5) -> float:
  """Median forward time of the attention op alone, `[1, L, 2, d_model / 2]` f32."""
  import jax
  import jax.numpy as jnp

  import attn
  from attn import SuperlinearConfig

  L, hd = s["seq_len"], s["d_model"] // 2
  q, k, v = (jax.random.normal(jax.random.key(i), (1, L, 2, hd)) for i in range(3))
  if name == "dense":
    fn = jax.jit(lambda q, k, v: attn.dense_attention(q, k, v, implementation="xla"))
  elif name == "superlinear":
    sl = SuperlinearConfig(sw_index=s["sw_index"])
    fn = jax.jit(lambda q, k, v: attn.superlinear_attention(
        q, k, v, q, None, config=sl, implementation="xla"))
  else:
    p = float(name[2:])
    fn = jax.jit(lambda q, k, v: attn.ppa_attention(q, k, v, p=p, window=s["window"],
                                                    implementation="xla"))
  jax.block_until_ready(fn(q, k, v))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(q, k, v))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def heldout_bits(model, task, s: dict) -> float:
  """Held-out next-byte bits per byte of plain text at the training length."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from train import data as data_lib
  from train import evaluate as ev

  rows = data_lib.heldout_windows(data_lib.load_split(task.source, "heldout"),
                                  s["seq_len"] + 1, s["eval_windows"])
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda params, t: ev.token_nll(nnx.merge(graphdef, params), t))
  size = max(1, 16384 // s["seq_len"])
  nll = np.concatenate([np.asarray(fn(params, jnp.asarray(rows[i:i + size])))
                        for i in range(0, len(rows), size)])
  return ev.bits_per_byte(nll.sum(), nll.size)


def niah_accuracy(model, task, s: dict, seed: int = 99) -> float:
  """Held-out NIAH accuracy at the training length, depths spread evenly."""
  from eval import niah

  depths = [i / 7 for i in range(8)]
  grid = niah.evaluate_grid(model, task, lengths=[s["seq_len"]], depths=depths,
                            samples=max(1, s["niah_samples"] // len(depths)), seed=seed)
  return float(grid.mean())


# ----------------------------------------------------------------------------
# Report


def plot(sweep, path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rs = results_lib.ppa_rows(sweep)
  ppa = [r for r in rs if r["p"] is not None]
  refs = [r for r in rs if r["p"] is None]
  fig, axes = plt.subplots(2, 2, figsize=(12, 8))
  metrics = (("bpb", "held-out bits per byte"), ("acc", "NIAH accuracy"))
  for col, (key, label) in enumerate(metrics):
    ax = axes[0, col]                                   # quality against p
    for r in ppa:
      ax.scatter([r["p"]] * len(r[key + "_seeds"]), r[key + "_seeds"], color="C0",
                 alpha=0.35, s=12)
    ax.plot([r["p"] for r in ppa], [r[key] for r in ppa], "o-", color="C0",
            label="PPA mean (p=0: sliding, p=1: dense)")
    for i, r in enumerate(refs):
      ax.axhline(r[key], color=f"C{i + 1}", linestyle="--", label=r["name"])
    ax.set_xlabel("p")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax = axes[1, col]                                   # quality against cost
    ax.plot([r["fraction"] for r in ppa], [r[key] for r in ppa], "o-", color="C0",
            label="PPA")
    for i, r in enumerate(refs):
      ax.plot([r["fraction"]], [r[key]], "s", color=f"C{i + 1}",
              label=r["name"] + ("" if r["exact"] else " (fraction: at most)"))
    ax.set_xscale("log")
    ax.set_xlabel("attended fraction of causal keys")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["fraction"] for r in ppa], [r["op_ms"] for r in ppa], "x:", color="gray")
    ax2.set_ylabel("attention op forward, ms (x)", color="gray")
    ax.legend(fontsize=7, loc="best")
  s = sweep["settings"]
  fig.suptitle(f"PPA S-curve: L={s['seq_len']}, window {s['window']}, "
               f"{s['steps']} steps, seeds {s['seeds']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Command line


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.ppa_sweep",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--scale", action="store_true", help="the accelerator preset")
  ap.add_argument("--out", default="docs")
  for key in ("seq_len", "window", "d_model", "num_layers", "steps", "batch_size",
              "warm_steps", "warm_len", "warm_batch", "eval_windows", "niah_samples",
              "sw_index"):
    ap.add_argument("--" + key.replace("_", "-"), type=int)
  ap.add_argument("--train-implementation", choices=["reference", "xla", "pallas"])
  ap.add_argument("--lr", type=float)
  ap.add_argument("--lm-weight", type=float)
  ap.add_argument("--seeds", nargs="+", type=int)
  ap.add_argument("--p", nargs="+", type=float, default=None,
                  help="p values (default 0, 0.125, ..., 1)")
  ap.add_argument("--no-references", action="store_true",
                  help="skip the superlinear reference run")
  ap.add_argument("--fresh", action="store_true")
  args = ap.parse_args(argv)
  preset = PRESETS["scale" if args.scale else "cpu"]
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  import jax
  from attn import SuperlinearConfig
  from eval import niah

  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "ppa_sweep.json")
  task = niah.TextNeedleTask()
  names = configs(args.p if args.p is not None else P_VALUES)
  if args.no_references:
    names = [n for n in names if n.startswith("p=")]
  s = {k: getattr(args, k) for k in PRESETS["cpu"]}
  s.update(configs=names, task=dataclasses.asdict(task), command_args=" ".join(argv))
  fixed = [k for k in PRESETS["cpu"] if k != "seeds"] + ["task"]
  sweep = None
  if os.path.exists(json_path) and not args.fresh:
    with open(json_path) as f:
      sweep = json.load(f)
    if any(sweep["settings"].get(k) != s[k] for k in fixed):
      raise SystemExit(f"{json_path} holds a sweep with other settings; pass --fresh or "
                       "another --out")
    sweep["settings"]["seeds"] = sorted(set(sweep["settings"]["seeds"]) | set(args.seeds))
    sweep["settings"]["configs"] = [n for n in names] + [
        n for n in sweep["settings"]["configs"] if n not in names]
    sweep["settings"]["command_args"] = s["command_args"]
  else:
    sweep = {"settings": s, "runs": {}, "cost": {}}
  sweep["device"] = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
  sl = SuperlinearConfig(sw_index=args.sw_index)
  for name in names:
    if name not in sweep["cost"]:
      cost = attended_fraction(name, args.seq_len, args.window, sl)
      cost["op_seconds"] = op_seconds(name, s)
      sweep["cost"][name] = cost
  plan = [(n, seed) for seed in args.seeds for n in names
          if f"{n}/seed{seed}" not in sweep["runs"]]
  print(f"[ppa_sweep] {len(plan)} runs to do", file=sys.stderr, flush=True)
  # ETA: a run costs about (per token) 3 d_model (projections and MLP, in units
  # of 4 d_model flops) + the keys a query attends; calibrated per setting.
  bar = progress.Progress(
      [3 * args.d_model + sweep["cost"][n]["keys"] / args.seq_len for n, _ in plan],
      kinds=[n for n, _ in plan])
  train_share = 0.8                  # the held-out and NIAH evaluations: the rest
  for i, (name, seed) in enumerate(plan):
    t0 = time.time()

    def on_log(step, loss, acc, i=i, name=name, seed=seed):
      bar.update(i, train_share * step / args.steps,
                 f"{name} seed {seed} step {step}/{args.steps} loss {loss:.3f}")

    model, history = niah.train_model(
        model_config(name, task, s), task, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, seed=seed, lm_weight=args.lm_weight,
        warm_steps=args.warm_steps, warm_len=args.warm_len, warm_batch=args.warm_batch,
        log_every=max(1, args.steps // 10), progress=on_log)
    t_train = time.time() - t0
    run = {"name": name, "seed": seed, "train_seconds": t_train, "history": history,
           "heldout_bits_per_byte": heldout_bits(model, task, s),
           "niah_accuracy": niah_accuracy(model, task, s)}
    sweep["runs"][f"{name}/seed{seed}"] = run
    sweep["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    with open(json_path + ".tmp", "w") as f:
      json.dump(sweep, f, indent=1)
    os.replace(json_path + ".tmp", json_path)
    bar.finish(i, f"{i + 1}/{len(plan)} {name} seed {seed}: "
                  f"{run['heldout_bits_per_byte']:.3f} bpb, NIAH {run['niah_accuracy']:.2f} "
                  f"({t_train:.0f} s)")
  plot(sweep, os.path.join(args.out, "ppa_sweep.png"))
  print("\n".join(results_lib.ppa_markdown(sweep)))
  results_lib.update(args.out)


if __name__ == "__main__":
  main()
