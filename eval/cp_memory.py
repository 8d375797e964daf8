"""Context parallelism, measured two ways.

Memory: compiled per-device temporary memory of each op at L = 16K, one
device vs 4-way sequence sharding (`seq_axis=`), forward and
forward+backward, from `compiled.memory_analysis()` on forced CPU devices
(no run, compile only):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. \
      python eval/cp_memory.py --out docs/cp_memory.json

Work: attended (query, key) pairs per shard in the contiguous and the zigzag
token order (`attn.context_parallel`), counted from each op's exact mask
(`attn.causal_mask`, `attn.sliding_window_mask`, `attn.ppa_mask`); host
numpy only:

  PYTHONPATH=. python eval/cp_memory.py --work --length 4096 --shards 4
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import attn
from attn import context_parallel

B, H, HK, D, DS = 1, 4, 2, 64, 16


def ops(seq_axis):
  kw = dict(implementation="xla", seq_axis=seq_axis)
  return {
      "ppa (p=0.5, window=64)": (3, lambda a: attn.ppa_attention(*a, p=0.5, window=64, **kw)),
      "sliding (window=512)": (3, lambda a: attn.sliding_window_attention(*a, window=512,
                                                                           **kw)),
      "superlinear (default config)": (5, lambda a: attn.superlinear_attention(*a, **kw)),
  }


def shapes(n, length, sharding):
  full = [(B, length, H, D), (B, length, HK, D), (B, length, HK, D), (B, length, H, DS),
          (B, length, HK, DS)][:n]
  return [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in full]


def temp_bytes(f, args, grad):
  if grad:
    fn = jax.jit(jax.grad(lambda *a: jnp.sum(f(list(a)).astype(jnp.float32)),
                          argnums=tuple(range(len(args)))))
  else:
    fn = jax.jit(lambda *a: f(list(a)))
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def shard_pairs(mask: np.ndarray, shards: int, order: str) -> np.ndarray:
  """Attended (query, key) pairs of each shard: `mask: bool [L, L]` (query
  rows in natural order), shard `s` owning the rows of its block in
  `order` ("contiguous" or "zigzag"). Returns int `[shards]`."""
  rows = mask.sum(axis=1)
  if order == "zigzag":
    rows = rows[context_parallel.zigzag_order(len(rows), shards)]
  return rows.reshape(shards, -1).sum(axis=1)


def work_table(length: int, shards: int) -> list[dict]:
  """Per-shard pairs of dense, sliding window and PPA in both orders."""
  masks = {
      "dense (causal)": attn.causal_mask(length),
      f"sliding (window={length // 8})": attn.sliding_window_mask(length,
                                                                   window=length // 8),
      "ppa (p=0.5, window=64)": attn.ppa_mask(length, p=0.5, window=64),
  }
  rows = []
  for name, mask in masks.items():
    for order in ("contiguous", "zigzag"):
      pairs = shard_pairs(np.asarray(mask, bool), shards, order)
      rows.append({"op": name, "order": order, "pairs": pairs.tolist(),
                   "max_over_mean": float(pairs.max() / pairs.mean())})
  return rows


def main(out, length, shards, only=None):
  mesh = jax.make_mesh((shards,), ("seq",), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:shards])
  rows = []
  for name, (n, f1) in ops(None).items():
    if only and not name.startswith(only):
      continue
    _, fs = ops("seq")[name]
    row = {"op": name, "L": length, "shards": shards}
    for grad in (False, True):
      tag = "fwd_bwd" if grad else "fwd"
      one = temp_bytes(f1, shapes(n, length, None), grad)
      with jax.set_mesh(mesh):
        sh = temp_bytes(fs, shapes(n, length, NamedSharding(mesh, P(None, "seq"))), grad)
      row[f"{tag}_unsharded_MiB"] = one / 2**20
      row[f"{tag}_sharded_MiB"] = sh / 2**20
      row[f"{tag}_ratio"] = sh / one
      print(name, tag, f"{one / 2**20:.1f} MiB -> {sh / 2**20:.1f} MiB ({sh / one:.2f}x)",
            flush=True)
    rows.append(row)
  with open(out, "w") as fh:
    json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="docs/cp_memory.json")
  p.add_argument("--length", type=int, default=16384)
  p.add_argument("--shards", type=int, default=4)
  p.add_argument("--work", action="store_true",
                 help="print per-shard attended pairs (contiguous vs zigzag) instead")
  p.add_argument("--op", default=None, choices=("ppa", "sliding", "superlinear"),
                 help="measure this op only (default: all)")
  a = p.parse_args()
  if a.work:
    for r in work_table(a.length, a.shards):
      print(f"| {r['op']} | {r['order']} | " + " | ".join(f"{x:,}" for x in r["pairs"])
            + f" | {r['max_over_mean']:.2f} |")
  else:
    main(a.out, a.length, a.shards, a.op)
