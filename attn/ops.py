"""Public attention ops: validation, then dispatch to an implementation.

Every op takes `q: [batch, q_len, num_q_heads, head_dim]` and
`k, v: [batch, kv_len, num_kv_heads, head_dim]` (the layout of
`jax.nn.dot_product_attention`), with `num_q_heads` a multiple of
`num_kv_heads` (GQA), float32 / bfloat16 / float16 inputs (softmax
statistics in float32), and returns an array like `q`. Attention is causal:
query `i` sits at absolute position `q_offset + i` (default
`kv_len - q_len`, i.e. the queries are the last positions) and never sees a
later key, so a fixed-size KV cache works with `q_offset` = the number of
tokens already in it. A concrete `q_offset` must lie in `[0, kv_len - q_len]`;
a traced int32 scalar is accepted but cannot be checked (out of range, a
query at a position outside `[0, kv_len)` has no key and returns zeros).

`implementation`:
  * `"reference"`: dense masked O(L^2) oracle, for tests;
  * `"xla"`: sub-quadratic pure-jnp path (contiguous slices, no L x L mask);
  * `"pallas"`: Pallas TPU/GPU kernels, for the ops in `_PALLAS_KERNELS`
    (others raise NotImplementedError); the platform's compiled kernel is
    picked at lowering time, on CPU a kernel runs in Pallas interpret mode
    (slow: tests and debugging). See docs/kernels.md;
  * `None`: the best available for the backend: `"pallas"` where the op's
    kernels carry a hardware record for this backend
    (`pallas_kernels.platform.HardwareCheck`), else `"xla"` (today `"xla"`
    everywhere).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from attn import _checks, _offsets, _pallas_decode, _pallas_ppa, _pallas_superlinear, reference, xla
from attn import _pallas_block_sparse as _pallas_bs
from attn.config import SuperlinearConfig
from attn.layout import BlockLayout
from pallas_kernels import block_sparse as _bs_kernels
from pallas_kernels import decode as _decode_kernels
from pallas_kernels import platform as _platform
from pallas_kernels import span as _span_kernels
from pallas_kernels import stripe as _stripe_kernels

# Ops with Pallas kernels -> the hardware records of those kernels.
_PALLAS_KERNELS = {
    "dense_attention": _bs_kernels.HARDWARE_CHECKS,
    "sliding_window_attention": _bs_kernels.HARDWARE_CHECKS,
    "block_sparse_attention": _bs_kernels.HARDWARE_CHECKS,
    "ppa_attention": _stripe_kernels.HARDWARE_CHECKS,
    # The superlinear path runs the stripe search and the span kernels: a
    # backend counts as checked only where both families are.
    "superlinear_attention": tuple(
        r for r in _span_kernels.HARDWARE_CHECKS
        if _platform.verified_on(_stripe_kernels.HARDWARE_CHECKS, r.backend)),
}


# Pallas prefill paths accept any traced q_offset (rows outside [0, kv_len)
# give zeros, as in the other paths).
_pallas_dense = _offsets.with_any_offset(_pallas_bs.dense, query_args=(0,), fills=(0,))
_pallas_sliding = _offsets.with_any_offset(_pallas_bs.sliding_window, query_args=(0,),
                                           fills=(0,))
_pallas_ppa_any = _offsets.with_any_offset(_pallas_ppa.ppa_attention, query_args=(0,),
                                           fills=(0,))
_pallas_superlinear_any = _offsets.with_any_offset(
    _pallas_superlinear.superlinear_attention, query_args=(0, 3), fills=(0, -1, 0))

# Ops whose decode calls (q_len <= _pallas_decode.MAX_DECODE_QUERIES) run
# the decode kernels.
_PALLAS_DECODE_OPS = frozenset({"ppa_attention", "superlinear_attention"})


def _resolve(implementation, op: str, q_len: int | None = None) -> str:
  _checks.check_implementation(implementation)
  decode = (op in _PALLAS_DECODE_OPS and q_len is not None
            and q_len <= _pallas_decode.MAX_DECODE_QUERIES)
  if implementation is None:
    records = _decode_kernels.VERIFIED if decode else _PALLAS_KERNELS.get(op, ())
    implementation = ("pallas" if _platform.verified_on(records, jax.default_backend())
                      else "xla")
  if implementation == "pallas" and decode:
    return "pallas_decode"
  if implementation == "pallas" and op not in _PALLAS_KERNELS:
    raise NotImplementedError(
        f"{op}: implementation='pallas' is not available yet (the Pallas TPU/GPU "
        "kernels are a later milestone). Use implementation='xla' or None.")
  return implementation


@functools.lru_cache(maxsize=None)
def _jitted(fn, statics: tuple):
  """`jax.jit` of `fn` with the hashable static keyword arguments bound."""
  return jax.jit(functools.partial(fn, **dict(statics)))


def _call(fn, *args, **statics):
  """Runs `fn(*args, **statics)` jitted (static arguments are hashable)."""
  return _jitted(fn, tuple(sorted(statics.items())))(*args)


def _prologue(q, k, v, scale, q_offset, implementation, op):
  impl = _resolve(implementation, op, q.shape[1] if hasattr(q, "shape") else None)
  _, lq, lk, _, _, d = _checks.check_qkv(q, k, v)
  _checks.check_q_offset(q_offset, lq, lk)
  return impl, _checks.check_scale(scale, d)


def dense_attention(q, k, v, *, scale=None, q_offset=None, implementation=None):
  """Causal softmax attention over every earlier key.

  Args:
    q: `[batch, q_len, num_q_heads, head_dim]`.
    k, v: `[batch, kv_len, num_kv_heads, head_dim]`.
    scale: score scale, default `1 / sqrt(head_dim)`.
    q_offset: absolute position of `q[:, 0]` (default `kv_len - q_len`).
    implementation: see the module docstring.

  Returns:
    `[batch, q_len, num_q_heads, head_dim]`, dtype of `q`.
  """
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation, "dense_attention")
  fn = {"reference": reference.dense_attention, "xla": xla.dense_attention,
        "pallas": _pallas_dense}[impl]
  return _call(fn, q, k, v, q_offset, scale=scale)


def sliding_window_attention(q, k, v, *, window, scale=None, q_offset=None,
                             implementation=None):
  """Causal sliding-window attention: query at `i` sees keys `[i - window + 1, i]`.

  `window` counts the query's own key (`window = 1`: only itself). Shapes and
  other arguments as in `dense_attention`. The `xla` path reads one
  contiguous slice of `block + window - 1` keys per query block: cost
  `O(L * window)`.
  """
  window = _checks.check_window(window)
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation,
                          "sliding_window_attention")
  fn = {"reference": reference.sliding_window_attention,
        "xla": xla.sliding_window_attention, "pallas": _pallas_sliding}[impl]
  return _call(fn, q, k, v, q_offset, window=window, scale=scale)


def ppa_attention(q, k, v, *, p, window=64, scale=None, q_offset=None,
                  implementation=None):
  """Power-based partial attention (PPA): cost `O(L^(1+p))`.

  A static, content-independent mask shared by every query, head and layer:
  query at position `i` attends key `i - d` iff `d < window` (the local
  window) or `d = ceil(s ** (1/p))` for an integer `s >= 1` (power-law
  offsets; exactly `floor(n**p)` of them in `[1, n]`). `p = 0` keeps only
  the window (equal to `sliding_window_attention(window)`), `p = 1` keeps
  every offset (equal to `dense_attention`); keys per query grow like
  `i**p`. `attn.ppa_mask` returns the mask itself; docs/ppa.md has pictures.

  The `xla` path never builds a dense mask: dense runs of kept offsets (the
  window, and for large `p` the first few hundred offsets) are banded key
  slices scored by a masked matmul per query block; every sparse far offset
  is one contiguous key slice per chunk of queries, scored row-wise.

  Args:
    q, k, v, scale, q_offset, implementation: as in `dense_attention`.
    p: exponent in `[0, 1]`.
    window: local window size (keys, the query's own included), `>= 1`.
  """
  p = _checks.check_p(p)
  window = _checks.check_window(window)
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation, "ppa_attention")
  if impl == "pallas_decode":
    return _call(_pallas_decode.ppa_decode, q, k, v, q_offset, p=p, window=window,
                 scale=scale)
  if impl == "pallas":
    return _call(_pallas_ppa_any, q, k, v, q_offset, p=p, window=window,
                 scale=scale)
  fn = reference.ppa_attention if impl == "reference" else xla.ppa_attention
  return _call(fn, q, k, v, q_offset, p=p, window=window, scale=scale)


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale=None,
                           implementation=None):
  """Attention restricted to a static block-sparse `layout`.

  The general op behind causal, sliding-window and any user block mask
  (`BlockLayout.from_mask`). Queries and keys must have the lengths the
  layout was built for. A query with no visible key returns zeros. The `xla`
  path visits, per query block, only the key blocks listed in the layout
  (query blocks bucketed by list length, padded to a power of two: at most
  twice the non-empty tiles). The `pallas` kernels visit exactly the
  non-empty tiles; a table layout (`from_mask` / `from_fn`) needs blocks
  that are powers of two >= 16 for them, band layouts (`causal`,
  `sliding_window`) run with any blocks.

  Args:
    q: `[batch, layout.q_len, num_q_heads, head_dim]`.
    k, v: `[batch, layout.kv_len, num_kv_heads, head_dim]`.
    layout: an `attn.BlockLayout`.
  """
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout must be an attn.BlockLayout, got {type(layout).__name__}.")
  impl = _resolve(implementation, "block_sparse_attention")
  _, lq, lk, _, _, d = _checks.check_qkv(q, k, v)
  if (lq, lk) != (layout.q_len, layout.kv_len):
    raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len="
                     f"{layout.kv_len} but q has {lq} and k has {lk} positions; "
                     "build the layout for these lengths.")
  scale = _checks.check_scale(scale, d)
  if impl == "pallas" and layout.band is None:
    if implementation is None and not _pallas_bs.kernel_blocks_ok(layout):
      impl = "xla"                  # best available for this layout
    else:
      _pallas_bs.host_tables(layout)  # ValueError early if its blocks do not suit the kernels
  fn = {"reference": reference.block_sparse_attention, "xla": xla.block_sparse_attention,
        "pallas": _pallas_bs.block_sparse}[impl]
  return _call(fn, q, k, v, layout=layout, scale=scale)


class SuperlinearOutput(NamedTuple):
  """Output of `superlinear_attention_with_anchors`.

  out: `[batch, q_len, num_q_heads, head_dim]`.
  anchors: int32 `[batch, q_len, num_q_heads, num_spans]`: selected anchor
    key positions, best first; -1 where fewer than `num_spans` are valid.
  gates: float32 `[batch, q_len, num_q_heads, num_spans]`: mixing weights.
  """
  out: jax.Array
  anchors: jax.Array
  gates: jax.Array


def superlinear_attention_with_anchors(q, k, v, q_search, k_search=None, *,
                                       config: SuperlinearConfig = SuperlinearConfig(),
                                       scale=None, q_offset=None,
                                       implementation=None) -> SuperlinearOutput:
  """`superlinear_attention` that also returns the selected anchors and gates."""
  if not isinstance(config, SuperlinearConfig):
    raise ValueError(f"config must be an attn.SuperlinearConfig, got "
                     f"{type(config).__name__}.")
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation,
                          "superlinear_attention")
  k_search = _checks.check_search(q, k, q_search, k_search)
  if impl == "pallas_decode":
    return SuperlinearOutput(*_call(_pallas_decode.superlinear_decode, q, k, v, q_search,
                                    k_search, q_offset, config=config, scale=scale))
  if impl == "pallas":
    return SuperlinearOutput(*_call(_pallas_superlinear_any, q, k, v,
                                    q_search, k_search, q_offset, config=config,
                                    scale=scale))
  fn = (reference.superlinear_attention if impl == "reference"
        else xla.superlinear_attention)
  return SuperlinearOutput(*_call(fn, q, k, v, q_search, k_search, q_offset,
                                  config=config, scale=scale))


def superlinear_attention(q, k, v, q_search, k_search=None, *,
                          config: SuperlinearConfig = SuperlinearConfig(),
                          scale=None, q_offset=None, implementation=None):
  """Superlinear multi-step attention (N = 2): `O(L^1.5)` at the defaults.

  For the query at absolute position `i` (`t = i + 1` visible keys), with
  `f(j) = floor(j ** (1/search_power))` (one shared integer table):

  1. Span-search: score the stripe anchors `a_j = i + 1 - f(j)`,
     `j = sw_index + 1, ...` (valid while `a_j >= 0`), with the unscaled
     float32 dot `<q_search_i, k_search[a_j]>`; keep the top `num_spans` per
     query head (ties keep the farther stripe).
  2. Span-attention: for each kept anchor `a`, one softmax (scale
     `1/sqrt(head_dim)`, query `q_i`) over the span
     `[max(a - ceil(bb t^sigma), 0), min(a + ceil(bf t^sigma), i - W)]`
     together with the window `[i - W + 1, i]`, `W = f(sw_index + 1) - 1`.
  3. Combine: `out_i = sum_k softmax(selected scores)_k * O_k`. Routing learns
     through this gate (anchor choice itself is not differentiable).

  Every earlier key is a candidate of every query (random context access);
  a query with no valid anchor (`t <= W`) gets window (= dense causal)
  attention. No span is ever dropped.

  Args:
    q: `[batch, q_len, num_q_heads, head_dim]`, the attention query.
    k, v: `[batch, kv_len, num_kv_heads, head_dim]`.
    q_search: `[batch, q_len, num_q_heads, search_dim]`, the routing query.
    k_search: `[batch, kv_len, num_kv_heads, search_dim]`, the keys the
      search scores against; `None` uses `k` (as the reference does).
    config: an `attn.SuperlinearConfig`.
    scale, q_offset, implementation: as in `dense_attention`.

  Returns:
    `[batch, q_len, num_q_heads, head_dim]`, dtype of `q`.
  """
  return superlinear_attention_with_anchors(
      q, k, v, q_search, k_search, config=config, scale=scale, q_offset=q_offset,
      implementation=implementation).out
