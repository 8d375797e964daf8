"""Benchmark cases of the stripe kernels, for `python -m eval.bench_kernels`.

Each case is a `KernelCase`: a name, the sequence lengths to sweep, and
`build(seq_len, dtype) -> (fn, args)` where `fn(*args)` is the jitted
forward (or forward+backward) to time; `baseline` names the dense op to
compare against in the same run. No timing happens here: the benchmark
driver (owned by the block-sparse kernels) times `fn` and writes the table.

Settings follow the project brief: bf16, head_dim 128, GQA 32:8; PPA at
p = 0.5 and 0.75 (window 64); the superlinear span-search at the default
config and at the released model's (sw_index=65, num_spans=3, search power
0.55).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import attn
from attn import _pallas_search

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0, forward_factor=1.0)


@dataclasses.dataclass(frozen=True)
class KernelCase:
  name: str
  lengths: tuple[int, ...]
  build: Callable          # (seq_len, dtype) -> (fn, args)
  baseline: str = "cudnn_dense"
  backward: bool = False


def _qkv(seq_len, dtype, key=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  q = jax.random.normal(k1, (1, seq_len, HEADS_Q, HEAD_DIM), dtype)
  k = jax.random.normal(k2, (1, seq_len, HEADS_KV, HEAD_DIM), dtype)
  v = jax.random.normal(k3, (1, seq_len, HEADS_KV, HEAD_DIM), dtype)
  return q, k, v


def _ppa(p, backward):
  def build(seq_len, dtype):
    q, k, v = _qkv(seq_len, dtype)
    op = lambda q, k, v: attn.ppa_attention(q, k, v, p=p, window=64,  # noqa: E731
                                            implementation="pallas")
    if backward:
      fn = jax.jit(jax.grad(lambda q, k, v: op(q, k, v).astype(jnp.float32).sum(),
                            argnums=(0, 1, 2)))
    else:
      fn = jax.jit(op)
    return fn, (q, k, v)
  return build


def _search(config):
  def build(seq_len, dtype):
    q, k, _ = _qkv(seq_len, dtype)
    fn = jax.jit(lambda qs, ks: _pallas_search.search(qs, ks, None, config=config))
    return fn, (q, k)
  return build


FORWARD_LENGTHS = tuple(1 << n for n in range(12, 21))     # 4K .. 1M
BACKWARD_LENGTHS = tuple(1 << n for n in range(12, 18))    # 4K .. 128K

CASES = (
    KernelCase("ppa_p0.5_fwd", FORWARD_LENGTHS, _ppa(0.5, False)),
    KernelCase("ppa_p0.75_fwd", FORWARD_LENGTHS, _ppa(0.75, False)),
    KernelCase("ppa_p0.5_fwd_bwd", BACKWARD_LENGTHS, _ppa(0.5, True), backward=True),
    KernelCase("ppa_p0.75_fwd_bwd", BACKWARD_LENGTHS, _ppa(0.75, True), backward=True),
    KernelCase("superlinear_search_default", FORWARD_LENGTHS,
               _search(attn.SuperlinearConfig()), baseline="none"),
    KernelCase("superlinear_search_released", FORWARD_LENGTHS, _search(RELEASED),
               baseline="none"),
)
