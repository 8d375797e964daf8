"""Superlinear end-to-end cases for `python -m eval.bench_kernels`.

`attn.superlinear_attention` (span-search, span-attention, combine) at the
default config and the released model's (sw_index=65, num_spans=3,
backward_factor=3, forward_factor=1, search and span power 0.55), through
the Pallas path (ours) and the `xla` path, forward and forward+backward
(gradients w.r.t. q, k, v and the routing query). The routing query
`q_search` is standard normal with `head_dim` features; `k_search` is `k`.
Where the op has no Pallas path yet the driver records the cell as failed
with the op's reason.

Attended entries (for TFLOP/s) are the nominal count: per query at
position `i` (`t = i + 1` visible keys) the window `min(t, W)` plus, for
each of the `min(num_spans, valid anchors)` spans, `min(bb_t + bf_t + 1,
t - W)` keys (`bb_t = ceil(bb t^sigma)`, `bf_t = ceil(bf t^sigma)`): an
upper bound of the selected spans' keys (spans clipped at the sequence
start, or overlapping one another, hold fewer). The search's scoring is not
counted.
"""

from __future__ import annotations

import jax
import numpy as np

import attn
from attn import masks
from eval.bench_kernels import Case, built, qkv

RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3.0, forward_factor=1.0)
CONFIGS = {"default": attn.SuperlinearConfig(), "released": RELEASED}


def valid_anchors(t: np.ndarray, max_len: int, config: attn.SuperlinearConfig) -> np.ndarray:
  """Number of stripe anchors `a_j = t - f(j) >= 0`, `j > sw_index`, per `t`."""
  f = np.sort(masks.superlinear_stripe_table(max_len, config).astype(np.int64))
  return np.searchsorted(f, t, side="right")


def superlinear_entries_per_query(t: np.ndarray, max_len: int,
                                  config: attn.SuperlinearConfig) -> np.ndarray:
  """Nominal attended keys of the queries with `t` visible keys (see module doc)."""
  t = np.asarray(t, np.int64)
  w = config.window
  grow = t.astype(np.float64) ** config.span_power
  span = (np.ceil(config.backward_factor * grow - 1e-9)
          + np.ceil(config.forward_factor * grow - 1e-9) + 1).astype(np.int64)
  far = np.maximum(t - w, 0)
  spans = np.minimum(valid_anchors(t, max_len, config), config.num_spans)
  return np.minimum(t, w) + spans * np.minimum(span, far)


def superlinear_entries(seq_len: int, config: attn.SuperlinearConfig, batch: int,
                        q_heads: int) -> int:
  t = np.arange(1, seq_len + 1, dtype=np.int64)
  return int(superlinear_entries_per_query(t, seq_len, config).sum()) * batch * q_heads


def _superlinear(config_name: str, impl: str):
  cfg = CONFIGS[config_name]

  def make(seq_len, dtype, key, config):
    k1, k2 = jax.random.split(key)
    q, k, v = qkv(k1, seq_len, dtype, config)
    q_search = jax.random.normal(k2, q.shape, dtype)

    def fn(q, k, v, q_search):
      return attn.superlinear_attention(q, k, v, q_search, config=cfg, implementation=impl)
    return built(fn, (q, k, v, q_search),
                 superlinear_entries(seq_len, cfg, config.batch, config.q_heads))
  return make


def _label(config_name, impl):
  cfg = CONFIGS[config_name]
  who = "ours (Pallas)" if impl == "pallas" else "xla path"
  return (f"superlinear {config_name} (sw {cfg.sw_index}, k {cfg.num_spans}, bb "
          f"{cfg.backward_factor:g}, bf {cfg.forward_factor:g}, p {cfg.search_power:g}, "
          f"sigma {cfg.span_power:g}), {who}")


CASES = [
    Case("superlinear_default", _label("default", "pallas"), "superlinear",
         _superlinear("default", "pallas")),
    Case("superlinear_released", _label("released", "pallas"), "superlinear",
         _superlinear("released", "pallas")),
    Case("superlinear_default_xla", _label("default", "xla"), "superlinear",
         _superlinear("default", "xla")),
    Case("superlinear_released_xla", _label("released", "xla"), "superlinear",
         _superlinear("released", "xla")),
]
