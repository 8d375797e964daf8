"""Benchmark cases of the superlinear span kernels for `eval.bench_kernels`.

`CASES`: superlinear attention with `implementation="pallas"` (stripe search
+ gate + span attention kernels) at

  * the default `attn.SuperlinearConfig()` (p = sigma = 1/2, 63-key window,
    2 spans), and
  * the released model's config (sw_index 65 -> W = 2032, 3 spans,
    backward_factor 3, forward_factor 1, search/span power 0.55),

with `q_search = q` and `k_search = k` (the reference's setting). Attended
entries count, per query, the window keys plus `num_spans` times the nominal
span length (each span's keys as the kernel scores them, overlaps counted per
span); the search dots are not counted.
"""

from __future__ import annotations

import numpy as np

import attn
from attn import masks

DEFAULT = attn.SuperlinearConfig()
RELEASED = attn.SuperlinearConfig(sw_index=65, num_spans=3, search_power=0.55,
                                  span_power=0.55, backward_factor=3, forward_factor=1)


def superlinear_entries(seq_len: int, config: attn.SuperlinearConfig, batch: int,
                        q_heads: int) -> int:
  """Nominal attended (query, key) entries of a causal prefill of `seq_len`."""
  t = np.arange(1, seq_len + 1, dtype=np.int64)          # visible keys per query
  w = config.window
  spans = masks.superlinear_span_table(seq_len, config).astype(np.int64)[1:]
  span_len = np.minimum(spans.sum(axis=1) + 1, np.maximum(t - w, 0))
  per_query = np.minimum(t, w) + config.num_spans * span_len
  return int(per_query.sum()) * batch * q_heads


def _superlinear(config: attn.SuperlinearConfig):
  def make(seq_len, dtype, key, bench_config):
    from eval import bench_kernels as bk  # noqa: PLC0415 (bench_kernels imports us)
    args = bk.qkv(key, seq_len, dtype, bench_config)

    def fn(q, k, v):
      return attn.superlinear_attention(q, k, v, q, None, config=config,
                                        implementation="pallas")

    return bk.built(fn, args, superlinear_entries(
        seq_len, config, bench_config.batch, bench_config.q_heads))
  return make


def _cases():
  from eval import bench_kernels as bk  # noqa: PLC0415
  return [
      bk.Case("superlinear_pallas", "superlinear (pallas, default config)", "superlinear",
              _superlinear(DEFAULT)),
      bk.Case("superlinear_released_pallas",
              "superlinear (pallas, released config: W=2032, 3 spans, p=0.55)",
              "superlinear", _superlinear(RELEASED)),
  ]


def __getattr__(name):
  # `CASES` is built on first access so that importing this module does not
  # import `eval.bench_kernels` (which imports this module to collect it).
  if name == "CASES":
    return _cases()
  raise AttributeError(name)
