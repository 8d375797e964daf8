"""Stripe-kernel cases for `python -m eval.bench_kernels`: PPA and the
superlinear span-search.

  * PPA p = 0.5 and 0.75 (`config.ppa_window`, 64 at full size) through
    `attn.ppa_attention(..., implementation="pallas")` (ours) and the `xla`
    path, forward and forward+backward. Attended entries: the exact count,
    `sum over kept offsets d < L of (L - d)` (every query `i >= d` keeps
    offset `d`).
  * The span-search alone (`attn.pallas.superlinear.search`: stripe anchor
    scores and the running top-`num_spans`) at the default config and the
    released model's (sw_index=65, num_spans=3, search power 0.55), forward
    only (the search is not differentiated; the gates are, inside the
    superlinear op). Entries: the scored anchors, `2 * head_dim` FLOPs each.
"""

from __future__ import annotations

import numpy as np

import attn
from attn import masks
from attn.pallas import superlinear as pallas_superlinear
from eval.bench_kernels import Built, Case, built, qkv
from eval.kernel_cases_superlinear import CONFIGS, valid_anchors


def ppa_entries_per_query(t: np.ndarray, max_len: int, *, p: float, window: int) -> np.ndarray:
  """Attended keys of the PPA queries with `t` visible keys."""
  offs = masks.ppa_offsets(max_len - 1, p=p, window=window)
  return np.searchsorted(offs, np.asarray(t, np.int64) - 1, side="right")


def ppa_entries(seq_len: int, *, p: float, window: int, batch: int, q_heads: int) -> int:
  offs = masks.ppa_offsets(seq_len - 1, p=p, window=window)
  return int(np.sum(seq_len - offs)) * batch * q_heads


def _ppa(p: float, impl: str):
  def make(seq_len, dtype, key, config):
    args = qkv(key, seq_len, dtype, config)
    w = config.ppa_window

    def fn(q, k, v):
      return attn.ppa_attention(q, k, v, p=p, window=w, implementation=impl)
    return built(fn, args, ppa_entries(seq_len, p=p, window=w, batch=config.batch,
                                       q_heads=config.q_heads))
  return make


def _search(config_name: str):
  cfg = CONFIGS[config_name]

  def make(seq_len, dtype, key, config):
    q, k, _ = qkv(key, seq_len, dtype, config)

    def fn(q_search, k_search):
      return pallas_superlinear.search(q_search, k_search, None, config=cfg)
    t = np.arange(1, seq_len + 1, dtype=np.int64)
    anchors = int(valid_anchors(t, seq_len, cfg).sum()) * config.batch * config.q_heads
    return Built(fn, None, (q, k), anchors, entry_flops=2)
  return make


CASES = [
    Case("ppa_p0.5", "PPA p=0.5 (window: config), ours (Pallas stripe)", "ppa",
         _ppa(0.5, "pallas")),
    Case("ppa_p0.75", "PPA p=0.75 (window: config), ours (Pallas stripe)", "ppa",
         _ppa(0.75, "pallas")),
    Case("ppa_p0.5_xla", "PPA p=0.5, xla path", "ppa", _ppa(0.5, "xla")),
    Case("ppa_p0.75_xla", "PPA p=0.75, xla path", "ppa", _ppa(0.75, "xla")),
    Case("search_default", "superlinear span-search alone, default config, ours (Pallas "
         "stripe)", "search", _search("default"), modes=("fwd",)),
    Case("search_released", "superlinear span-search alone, released config, ours (Pallas "
         "stripe)", "search", _search("released"), modes=("fwd",)),
]
