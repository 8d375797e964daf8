"""Decode benchmark cases of the Pallas decode kernels (for `eval.bench_kernels`).

Latency per generated token: one query (`q_len = 1`) at the last position of
a KV cache of `L` tokens, bf16, head_dim 128, GQA 32:8, batch 1, for

  * superlinear, the default config and the released model's config
    (sw_index=65, num_spans=3, backward_factor=3, forward_factor=1, search
    and span power 0.55), Pallas decode kernels;
  * PPA p = 0.5 and 0.75 (window 64), Pallas decode kernels;
  * dense decode, `jax.nn.dot_product_attention` (cuDNN on a GPU, XLA
    elsewhere) over the valid cache prefix, the baseline;

at `L` = 32K ... 1M. `cases(lengths)` returns `DecodeCase`s; each builds its
inputs from a PRNG key and returns a jittable `fn` and its arguments, so a
runner times `jax.jit(fn).lower(*args).compile()` the same way for every
case. `python -m eval.kernel_cases_decode --lengths 32768,65536` times them
on the host backend and prints the table (no file is written: the lead's
`eval.bench_kernels` owns `docs/benchmarks.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

import attn
from attn import _pallas_decode as pd

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 1, 32, 8, 128
DTYPE = jnp.bfloat16
DEFAULT_LENGTHS = (32768, 131072, 262144, 524288, 1048576)
RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0, forward_factor=1.0)
PPA_WINDOW = 64


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  name: str                    # stable key, e.g. "decode_superlinear_default"
  label: str                   # human-readable row label
  family: str                  # "superlinear", "ppa", "dense"
  cache_len: int               # L
  make: Callable               # key -> (fn, args); fn(*args) -> [B, 1, Hq, D]


def _inputs(key, cache_len):
  kq, kk, kv, ks = jax.random.split(key, 4)
  q = jax.random.normal(kq, (BATCH, 1, Q_HEADS, HEAD_DIM), DTYPE)
  k = jax.random.normal(kk, (BATCH, cache_len, KV_HEADS, HEAD_DIM), DTYPE)
  v = jax.random.normal(kv, (BATCH, cache_len, KV_HEADS, HEAD_DIM), DTYPE)
  qs = jax.random.normal(ks, (BATCH, 1, Q_HEADS, HEAD_DIM), DTYPE)
  return q, k, v, qs


def _superlinear(config):
  def make(key, cache_len):
    q, k, v, qs = _inputs(key, cache_len)

    def fn(q, k, v, qs, offset):
      return pd.superlinear_decode(q, k, v, qs, k, offset, config=config,
                                   scale=HEAD_DIM ** -0.5)[0]
    return fn, (q, k, v, qs, jnp.int32(cache_len - 1))
  return make


def _ppa(p):
  def make(key, cache_len):
    q, k, v, _ = _inputs(key, cache_len)

    def fn(q, k, v, offset):
      return pd.ppa_decode(q, k, v, offset, p=p, window=PPA_WINDOW,
                           scale=HEAD_DIM ** -0.5)
    return fn, (q, k, v, jnp.int32(cache_len - 1))
  return make


def _dense(key, cache_len):
  q, k, v, _ = _inputs(key, cache_len)
  impl = "cudnn" if jax.default_backend() == "gpu" else None

  def fn(q, k, v, valid):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=valid,
                                        implementation=impl)
  return fn, (q, k, v, jnp.full((BATCH,), cache_len, jnp.int32))


def cases(lengths=DEFAULT_LENGTHS) -> list[DecodeCase]:
  rows = [
      ("decode_superlinear_default", "superlinear default, pallas decode", "superlinear",
       _superlinear(attn.SuperlinearConfig())),
      ("decode_superlinear_released", "superlinear released (sw65 k3 bb3 bf1 p0.55), "
       "pallas decode", "superlinear", _superlinear(RELEASED)),
      ("decode_ppa_p0.5", f"PPA p=0.5 w={PPA_WINDOW}, pallas decode", "ppa", _ppa(0.5)),
      ("decode_ppa_p0.75", f"PPA p=0.75 w={PPA_WINDOW}, pallas decode", "ppa", _ppa(0.75)),
      ("decode_dense", "dense decode, jax.nn.dot_product_attention (cuDNN on GPU)",
       "dense", _dense),
  ]
  return [DecodeCase(name, label, family, n,
                     (lambda make, n: lambda key: make(key, n))(make, n))
          for n in lengths for name, label, family, make in rows]


def time_case(case: DecodeCase, *, repeats: int = 5) -> float:
  """Median seconds per call of the AOT-compiled case (after a warm-up)."""
  fn, args = case.make(jax.random.key(0))
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
  parser.add_argument("--only", default="", help="comma separated case names")
  args = parser.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  only = set(filter(None, args.only.split(",")))
  print(f"# decode latency per token, {jax.devices()[0].device_kind}, "
        f"B={BATCH} Hq={Q_HEADS} Hk={KV_HEADS} D={HEAD_DIM} bf16")
  print("| case | L | ms/token |\n|---|---|---|")
  for case in cases(lengths):
    if only and case.name not in only:
      continue
    try:
      ms = f"{time_case(case) * 1e3:.3f}"
    except Exception as e:  # noqa: BLE001  (report, keep going)
      ms = f"failed: {type(e).__name__}"
    print(f"| {case.label} | {case.cache_len} | {ms} |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
