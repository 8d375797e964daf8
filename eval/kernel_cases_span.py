"""Span-attention kernel cases for `python -m eval.bench_kernels`.

The end-to-end superlinear op (search + gate + span attention) is measured by
`eval/kernel_cases_superlinear.py`; these cases time the span-attention
kernels alone (`pallas_kernels.span.span_attention`: window + the selected
spans, merged by log-sum-exp and mixed by the gates), forward and
forward+backward (gradients w.r.t. q, k, v and the gates), at the default
config and the released model's (sw_index=65, num_spans=3,
backward_factor=3, forward_factor=1, search/span power 0.55).

Anchors are synthetic: each slot of each (query, head) picks a uniformly
random valid stripe anchor `a_j = i + 1 - f(j)` (repeats allowed; -1 where
the query has no valid stripe), so the spans have the lengths and positions
the search can produce without running it. Gates are a softmax of standard
normal logits. Attended entries: the nominal count of
`kernel_cases_superlinear.superlinear_entries`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attn
from attn import masks
from eval.bench_kernels import Case, built, qkv
from eval.kernel_cases_superlinear import CONFIGS, superlinear_entries
from pallas_kernels import span as span_kernels


def random_anchors(key, batch: int, seq_len: int, heads: int,
                   config: attn.SuperlinearConfig):
  """int32 `[B, L, H, num_spans]`: random valid stripe anchors (-1: none)."""
  f_near_first = jnp.asarray(np.sort(masks.superlinear_stripe_table(seq_len, config)),
                             jnp.int32)
  t = jnp.arange(1, seq_len + 1, dtype=jnp.int32)                    # t = i + 1
  n_valid = jnp.searchsorted(f_near_first, t, side="right")          # [L]
  u = jax.random.uniform(key, (batch, seq_len, heads, config.num_spans))
  j = jnp.minimum((u * n_valid[None, :, None, None]).astype(jnp.int32),
                  jnp.maximum(n_valid - 1, 0)[None, :, None, None])
  anchor = t[None, :, None, None] - f_near_first[j]
  return jnp.where(n_valid[None, :, None, None] > 0, anchor, -1).astype(jnp.int32)


def _span(config_name: str):
  cfg = CONFIGS[config_name]

  def make(seq_len, dtype, key, config):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = qkv(k1, seq_len, dtype, config)
    anchors = random_anchors(k2, config.batch, seq_len, config.q_heads, cfg)
    gates = jax.nn.softmax(jax.random.normal(k3, anchors.shape, jnp.float32), axis=-1)
    table = jnp.asarray(masks.superlinear_span_table(seq_len, cfg))

    def fn(q, k, v, gates, anchors, table):
      heads_first = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # noqa: E731  [B, Hq, K, L]
      return span_kernels.span_attention(q, k, v, heads_first(anchors), heads_first(gates),
                                         span_table=table, window=cfg.window,
                                         scale=q.shape[-1] ** -0.5)
    return built(fn, (q, k, v, gates, anchors, table),
                 superlinear_entries(seq_len, cfg, config.batch, config.q_heads))
  return make


def _label(config_name):
  cfg = CONFIGS[config_name]
  return (f"span attention kernels alone, {config_name} config (W {cfg.window}, "
          f"k {cfg.num_spans}, p {cfg.search_power:g}), random stripe anchors")


CASES = [
    Case("span_default", _label("default"), "superlinear", _span("default")),
    Case("span_released", _label("released"), "superlinear", _span("released")),
]
