"""Decode cases for `python -m eval.bench_kernels` (mode `decode`).

Latency per generated token: `config.decode_tokens` tokens generated in one
jitted `lax.fori_loop` (one query, `q_len = 1`, per step, at the cache
positions `L - tokens .. L - 1` of a KV cache of `L` tokens,
`config.decode_lengths`, 128K and 1M at full size), timed together and
divided by the tokens; batch/heads/head_dim/dtype of the run (bf16,
head_dim 128, GQA 32:8), the cache position a traced int32 `q_offset` as
in a generation loop:

  * superlinear, default and released config (sw_index=65, num_spans=3,
    backward_factor=3, forward_factor=1, powers 0.55):
    `attn.superlinear_attention(..., implementation="pallas")`, whose
    one-token calls run the Pallas decode kernels;
  * PPA p = 0.5 and 0.75 (`config.ppa_window`), the same way;
  * dense decode, the baselines: `jax.nn.dot_product_attention` over the
    cache with `key_value_seq_lengths`, `implementation="cudnn"` (fails
    where cuDNN is absent, and is recorded so) and `"xla"`.

Attended entries: keys the token reads per query head (superlinear: the
nominal count of `kernel_cases_superlinear`), times batch and heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attn
from eval.bench_kernels import Built, Case
from eval.kernel_cases_stripe import ppa_entries_per_query
from eval.kernel_cases_superlinear import CONFIGS, superlinear_entries_per_query

MODES = ("decode",)


def decode_inputs(key, cache_len, dtype, config):
  """q, q_search `[B, 1, Hq, D]`, k, v `[B, L, Hk, D]`, standard normal."""
  kq, kk, kv, ks = jax.random.split(key, 4)
  b, hq, hk, d = config.batch, config.q_heads, config.kv_heads, config.head_dim
  return (jax.random.normal(kq, (b, 1, hq, d), dtype),
          jax.random.normal(kk, (b, cache_len, hk, d), dtype),
          jax.random.normal(kv, (b, cache_len, hk, d), dtype),
          jax.random.normal(ks, (b, 1, hq, d), dtype))


def token_loop(step, tokens):
  """`fn(q, *rest, last)`: `step(q, *rest, pos)` for the `tokens` positions
  `last - tokens + 1 .. last` in one `lax.fori_loop`; returns the sum of the
  outputs (keeps every step live)."""
  def fn(q, *args):
    *rest, last = args

    def body(i, acc):
      return acc + step(q, *rest, last - tokens + 1 + i).astype(jnp.float32)

    return jax.lax.fori_loop(0, tokens, body, jnp.zeros(q.shape, jnp.float32))
  return fn


def _superlinear(config_name):
  cfg = CONFIGS[config_name]

  def make(cache_len, dtype, key, config):
    q, k, v, qs = decode_inputs(key, cache_len, dtype, config)

    def step(q, k, v, qs, offset):
      return attn.superlinear_attention(q, k, v, qs, config=cfg, q_offset=offset,
                                        implementation="pallas")
    keys = int(superlinear_entries_per_query(np.array([cache_len]), cache_len, cfg)[0])
    n = min(config.decode_tokens, cache_len)
    return Built(token_loop(step, n), None, (q, k, v, qs, jnp.int32(cache_len - 1)),
                 keys * config.batch * config.q_heads, tokens=n)
  return make


def _ppa(p):
  def make(cache_len, dtype, key, config):
    q, k, v, _ = decode_inputs(key, cache_len, dtype, config)
    w = config.ppa_window

    def step(q, k, v, offset):
      return attn.ppa_attention(q, k, v, p=p, window=w, q_offset=offset,
                                implementation="pallas")
    keys = int(ppa_entries_per_query(np.array([cache_len]), cache_len, p=p, window=w)[0])
    n = min(config.decode_tokens, cache_len)
    return Built(token_loop(step, n), None, (q, k, v, jnp.int32(cache_len - 1)),
                 keys * config.batch * config.q_heads, tokens=n)
  return make


def _dense(impl):
  def make(cache_len, dtype, key, config):
    q, k, v, _ = decode_inputs(key, cache_len, dtype, config)

    def step(q, k, v, pos):
      valid = jnp.full((q.shape[0],), pos + 1, jnp.int32)
      return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=valid,
                                          implementation=impl)
    n = min(config.decode_tokens, cache_len)
    return Built(token_loop(step, n), None, (q, k, v, jnp.int32(cache_len - 1)),
                 cache_len * config.batch * config.q_heads, tokens=n)
  return make


CASES = [
    Case("decode_superlinear_default", "decode, superlinear default, ours (Pallas decode)",
         "decode", _superlinear("default"), modes=MODES),
    Case("decode_superlinear_released", "decode, superlinear released (sw 65, k 3, bb 3, "
         "bf 1, p 0.55), ours (Pallas decode)", "decode", _superlinear("released"),
         modes=MODES),
    Case("decode_ppa_p0.5", "decode, PPA p=0.5, ours (Pallas decode)", "decode", _ppa(0.5),
         modes=MODES),
    Case("decode_ppa_p0.75", "decode, PPA p=0.75, ours (Pallas decode)", "decode",
         _ppa(0.75), modes=MODES),
    Case("decode_dense_cudnn", "decode, dense, jax.nn cuDNN (baseline)", "decode",
         _dense("cudnn"), modes=MODES),
    Case("decode_dense_xla", "decode, dense, jax.nn xla (baseline)", "decode", _dense("xla"),
         modes=MODES),
]
