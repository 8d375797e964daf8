"""The shared op test table: one input builder, one tolerance table, fixed
seeds, and the ops x scenarios that `tests/test_op_suite.py` runs against
every implementation.

An op case turns inputs into a call of the public `attn` API; its oracle
comes from `tests/attn_oracles.py` (own offset and span arithmetic, dense
masked float32 jnp, differentiable), never from the code under test.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import attn
from tests import attn_oracles

IMPLEMENTATIONS = ("reference", "xla", "pallas")   # pallas: interpret mode on CPU
SEED = 0

# Tolerances against the float32 oracle. float32: elementwise. bfloat16:
# relative L2 error of out / each gradient against the oracle on the same
# (rounded) inputs; measured for the bf16 cases below: <= 0.21% (out) and
# <= 0.37% (gradients) for reference, xla and pallas (interpret mode).
TOL = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5, grad_atol=5e-5, grad_rtol=5e-4),
    jnp.bfloat16: dict(rel_l2=6e-3, grad_rel_l2=1e-2),
}
# bfloat16 against a float32 reference of the same op: at most this multiple
# of the bf16 reference's own error (tests/test_ops.py, xla path).
BF16_ERROR_RATIO = 1.5

SMALL_CFG = attn.SuperlinearConfig(sw_index=2, num_spans=2)          # W = 8
NO_WINDOW_CFG = attn.SuperlinearConfig(sw_index=0, num_spans=3, backward_factor=2.0,
                                       forward_factor=0.0)
CUBIC_CFG = attn.SuperlinearConfig(sw_index=1, num_spans=2, search_power=1 / 3,
                                   span_power=0.75, backward_factor=2.0)
SL_055 = attn.SuperlinearConfig(sw_index=2, num_spans=2, search_power=0.55,
                                span_power=0.55, backward_factor=3.0)   # W = 7
FIVE_SPANS_CFG = attn.SuperlinearConfig(sw_index=0, num_spans=5, backward_factor=2.0,
                                        forward_factor=0.0)             # W = 0


def inputs(seed=SEED, *, batch=2, q_len=45, kv_len=None, hq=4, hk=2, d=16, ds=8,
           dtype=jnp.float32) -> dict:
  """The one input builder: standard normal q, k, v, q_search, k_search
  (`q: [batch, q_len, hq, d]`, `k, v: [batch, kv_len, hk, d]`, search
  `[.., ds]`), drawn in float32 from a fixed seed, then cast to `dtype`."""
  kv_len = q_len if kv_len is None else kv_len
  key = seed if isinstance(seed, jax.Array) else jax.random.PRNGKey(seed)
  ks = jax.random.split(key, 5)
  n = lambda k_, s: jax.random.normal(k_, s, jnp.float32).astype(dtype)  # noqa: E731
  return dict(q=n(ks[0], (batch, q_len, hq, d)), k=n(ks[1], (batch, kv_len, hk, d)),
              v=n(ks[2], (batch, kv_len, hk, d)), q_search=n(ks[3], (batch, q_len, hq, ds)),
              k_search=n(ks[4], (batch, kv_len, hk, ds)))


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Scenario:
  """Shapes, dtype and cache position of one call. `q_offset` None: the
  queries are the last positions (prefill); an int is passed traced
  (`jnp.int32`, as a decode loop does). `nan_tail`: NaN in k, v, k_search at
  every cache slot past the last query (slots no query may see)."""
  batch: int
  q_len: int
  kv_len: int
  hq: int
  hk: int
  dtype: type = jnp.float32
  q_offset: int | None = None
  nan_tail: bool = False
  d: int = 16
  ds: int = 8

  def offset(self) -> int:
    return self.kv_len - self.q_len if self.q_offset is None else self.q_offset


SCENARIOS = {
    # prefill: GQA 2:1, float32, batch 2.
    "prefill-gqa-f32": Scenario(2, 40, 40, 4, 2),
    # chunked prefill at a traced offset (q_len 20 > 16: the prefill
    # kernels), MHA, bfloat16, NaN past the last query.
    "chunk-mha-bf16-nan": Scenario(1, 20, 48, 2, 2, jnp.bfloat16, 22, True),
    # decode-sized calls (q_len <= 16: the pallas decode kernels) against a
    # longer cache, traced offset, NaN past the last query.
    "decode16-gqa-f32-nan": Scenario(1, 16, 64, 4, 1, jnp.float32, 30, True),
    "decode1-mha-bf16-nan": Scenario(1, 1, 64, 2, 2, jnp.bfloat16, 50, True),
    # traced offset before the cache start: rows at negative positions are 0.
    "offset-negative-gqa-f32": Scenario(1, 20, 40, 4, 2, jnp.float32, -5, True),
}


@dataclasses.dataclass(frozen=True)
class OpCase:
  """`call(x, impl, q_offset) -> out` or `(out, anchors)`; `keep(pos, j)` for
  the masked oracle (None: superlinear, oracle from `attn_oracles`)."""
  call: Callable
  keep: Callable | None = None
  config: attn.SuperlinearConfig | None = None
  search: bool = False          # differentiate q_search, k_search too
  layout: Callable | None = None  # block_sparse: Scenario -> (BlockLayout, mask)


def _with_anchors(cfg):
  def call(x, impl, off):
    r = attn.superlinear_attention_with_anchors(
        x["q"], x["k"], x["v"], x["q_search"], x["k_search"], config=cfg, q_offset=off,
        implementation=impl)
    return r.out, r.anchors
  return call


def _cache_layout(s: Scenario):
  """Query `i` (position `offset + i`) sees the 9 keys up to itself, minus
  four keys inside a tile (a hole in a partial tile); blocks 16 x 16."""
  pos = s.offset() + np.arange(s.q_len)[:, None]
  kpos = np.arange(s.kv_len)[None, :]
  mask = (kpos <= pos) & (kpos > pos - 9) & ~((kpos >= 20) & (kpos < 24))
  mask[3] = False                                   # a query that sees nothing
  return attn.BlockLayout.from_mask(mask, block_q=16, block_k=16), mask


OPS = {
    "dense": OpCase(lambda x, impl, off: attn.dense_attention(
        x["q"], x["k"], x["v"], q_offset=off, implementation=impl), lambda pos, j: True),
    "sliding": OpCase(lambda x, impl, off: attn.sliding_window_attention(
        x["q"], x["k"], x["v"], window=11, q_offset=off, implementation=impl),
        lambda pos, j: pos - j < 11),
    "block_sparse": OpCase(None, layout=_cache_layout),
    "ppa_0.5": OpCase(lambda x, impl, off: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.5, window=4, q_offset=off, implementation=impl),
        attn_oracles.ppa_keep(0.5, 4, 256)),
    "ppa_0.55": OpCase(lambda x, impl, off: attn.ppa_attention(
        x["q"], x["k"], x["v"], p=0.55, window=3, q_offset=off, implementation=impl),
        attn_oracles.ppa_keep(0.55, 3, 256)),
    "superlinear": OpCase(_with_anchors(SMALL_CFG), config=SMALL_CFG, search=True),
    "superlinear_0.55": OpCase(_with_anchors(SL_055), config=SL_055, search=True),
    # superlinear_attention itself, k_search=None (the keys are the search keys).
    "superlinear_k_as_search_key": OpCase(
        lambda x, impl, off: attn.superlinear_attention(
            x["q"], x["k"], x["v"], x["q"], None, config=FIVE_SPANS_CFG, q_offset=off,
            implementation=impl), config=FIVE_SPANS_CFG),
}

# (op, scenario) pairs the suite runs against every implementation: every op
# with a traced-offset call and NaN in the unused cache slots, each dtype and
# head grouping, prefill, and the decode sizes for the ops with decode
# kernels. Pairs are few because pallas interpret mode is slow (the
# superlinear prefill kernels most: ~1-2 min a pair on a loaded 2-core CPU).
CASES = [
    ("dense", "prefill-gqa-f32"), ("dense", "decode1-mha-bf16-nan"),
    ("dense", "offset-negative-gqa-f32"),
    ("sliding", "chunk-mha-bf16-nan"), ("sliding", "decode16-gqa-f32-nan"),
    ("block_sparse", "prefill-gqa-f32"), ("block_sparse", "chunk-mha-bf16-nan"),
    ("ppa_0.5", "decode1-mha-bf16-nan"), ("ppa_0.5", "offset-negative-gqa-f32"),
    ("ppa_0.55", "chunk-mha-bf16-nan"), ("ppa_0.55", "decode16-gqa-f32-nan"),
    ("superlinear", "decode1-mha-bf16-nan"), ("superlinear", "offset-negative-gqa-f32"),
    ("superlinear_0.55", "chunk-mha-bf16-nan"), ("superlinear_0.55", "decode16-gqa-f32-nan"),
    ("superlinear_k_as_search_key", "prefill-gqa-f32"),
]


def grad_names(op: str) -> list[str]:
  return ["q", "k", "v"] + (["q_search", "k_search"] if OPS[op].search else [])


def scenario_inputs(s: Scenario) -> tuple[dict, dict]:
  """`(clean, dirty)`: the scenario's inputs, and the same with NaN in k, v
  and k_search past the last query when `s.nan_tail`."""
  clean = inputs(SEED, batch=s.batch, q_len=s.q_len, kv_len=s.kv_len, hq=s.hq, hk=s.hk,
                 d=s.d, ds=s.ds, dtype=s.dtype)
  if not s.nan_tail:
    return clean, clean
  tail = (np.arange(s.kv_len) > s.offset() + s.q_len - 1)[None, :, None, None]
  dirty = dict(clean, **{n: jnp.where(tail, jnp.nan, clean[n]).astype(s.dtype)
                         for n in ("k", "v", "k_search")})
  return clean, dirty


def oracle(op: str, s: Scenario, x: dict):
  """`(fn(*grad args) -> float32 out, anchors or None)` for the scenario's
  clean inputs `x` (cast to float32 by the oracle)."""
  case = OPS[op]
  names = grad_names(op)
  if case.layout is not None:
    _, mask = case.layout(s)
    return (lambda q, k, v: attn_oracles.masked_attention(q, k, v, mask[None, None])), None
  if case.keep is not None:
    mask = attn_oracles.keep_mask(case.keep, s.q_len, s.kv_len, s.offset())
    return (lambda q, k, v: attn_oracles.masked_attention(q, k, v, mask[None, None])), None
  f32 = {n: np.asarray(a, np.float32) for n, a in x.items()}
  qs, ks = (f32["q_search"], f32["k_search"]) if case.search else (f32["q"], f32["k"])
  _, anchors = attn_oracles.superlinear_loop(f32["q"], f32["k"], f32["v"], qs, ks,
                                             **vars(case.config), q_offset=s.offset())
  slots = attn_oracles.superlinear_slot_masks(anchors, s.kv_len, **vars(case.config),
                                              q_offset=s.offset())
  if case.search:
    fn = lambda q, k, v, qs_, ks_: attn_oracles.superlinear_dense(  # noqa: E731
        q, k, v, qs_, ks_, anchors, slots)
  else:
    fn = lambda q, k, v: attn_oracles.superlinear_dense(  # noqa: E731
        q, k, v, q, k, anchors, slots)
  assert len(names) == (5 if case.search else 3)
  return fn, anchors


def call(op: str, s: Scenario, impl: str):
  """`f(args: list, q_offset) -> (out, anchors or None)` calling the public op."""
  case = OPS[op]
  names = grad_names(op)

  def f(args, off, x):
    y = dict(x, **dict(zip(names, args)))
    if case.layout is not None:
      layout, _ = case.layout(s)
      out = attn.block_sparse_attention(y["q"], y["k"], y["v"], layout, implementation=impl)
    else:
      out = case.call(y, impl, off)
    return out if isinstance(out, tuple) else (out, None)
  return f
