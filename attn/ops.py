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

`implementation` (one of `attn.IMPLEMENTATION_CHOICES`):
  * `"reference"`: dense masked O(L^2) oracle, for tests;
  * `"xla"`: sub-quadratic pure-jnp path (contiguous slices, no L x L mask);
  * `"pallas"`: Pallas TPU/GPU kernels (`attn.pallas`); the platform's
    compiled kernel is picked at lowering time, on CPU a kernel runs in
    Pallas interpret mode (slow: tests and debugging). PPA and superlinear
    calls with at most `attn.pallas.decode.MAX_QUERIES` queries run the
    decode kernels, longer ones the prefill kernels. See docs/kernels.md;
  * `None`: the best available for the backend: `"pallas"` where the kernels
    the call would run carry a hardware record for this backend
    (`attn.pallas.supported`), else `"xla"` (today `"xla"` everywhere).

Each op validates its arguments, then calls `IMPLEMENTATIONS[op][impl]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.typing import ArrayLike

from attn import _checks, auto_partition, context_parallel, pallas, reference, sharding, xla
from attn.config import SuperlinearConfig
from attn.layout import BlockLayout

OPS = ("dense_attention", "sliding_window_attention", "ppa_attention",
       "block_sparse_attention", "superlinear_attention")

# op -> implementation -> function. Each path module (`attn.reference`,
# `attn.xla`, `attn.pallas`) defines every op under the op's name, with the
# same signature and semantics: `fn(*arrays, q_offset, **statics)` (block
# sparse: `fn(q, k, v, *, layout, scale)`).
IMPLEMENTATIONS = {
    op: {name: getattr(path, op)
         for name, path in (("reference", reference), ("xla", xla), ("pallas", pallas))}
    for op in OPS
}


def resolve_implementation(op: str, implementation, q_len: int | None = None) -> str:
  """The implementation `op` runs for `implementation` (None = best available).

  `q_len`: the call's query count (decode calls may have other kernels).
  """
  _checks.check_implementation(implementation)
  if implementation is not None:
    return implementation
  return "pallas" if pallas.supported(op, jax.default_backend(), q_len) else "xla"


@functools.lru_cache(maxsize=None)
def _jitted(fn, op: str, statics: tuple, roles: tuple, plan, n_out: int):
  """`jax.jit` of `fn` with the hashable static keyword arguments bound, run
  per shard of `plan` (`attn.sharding`)."""
  statics = dict(statics)
  if fn.__module__.startswith("attn.pallas"):
    fn = sharding.vma_typed(fn)
  if plan is not None and plan.seq:
    local = context_parallel.local_fn(op, fn, roles, plan.seq[0], statics,
                                      plan.seq_order, plan.q_seq)
  else:
    local = functools.partial(fn, **statics)
  if plan is not None and plan.auto:
    whole = functools.partial(fn, **statics)
    return jax.jit(lambda *args: auto_partition.auto_call(local, args, roles, n_out,
                                                          plan.seq, whole))
  return jax.jit(lambda *args: sharding.run(local, args, roles, plan, n_out))


def _roles(n_arrays: int, op: str) -> tuple:
  """Roles of `(q, k, v[, q_search, k_search][, q_offset])`."""
  roles = (sharding.Q, sharding.KV, sharding.KV)
  if n_arrays == 5:
    roles += (sharding.Q, sharding.KV)
  return roles + (() if op == "block_sparse_attention" else (sharding.SCALAR,))


def _call(op, *args, seq_axis=None, seq_order="contiguous", n_out=1, **statics):
  """Runs `IMPLEMENTATIONS[op][impl](*args, **statics)` jitted (static
  arguments are hashable), per shard where the inputs are sharded."""
  fn = statics.pop("fn")
  roles = _roles(len(args) - (op != "block_sparse_attention"), op)
  plan = sharding.plan(args[0], args[1], seq_axis, seq_order)
  if plan is not None and plan.seq:
    # Inside shard_map the arrays are local blocks: zigzag needs 2 chunks each.
    n = 1 if plan.manual else plan.mesh.shape[seq_axis]
    n = (2 * n) if seq_order == "zigzag" else n
    what = ("2 * axis size" if seq_order == "zigzag" else "the axis size") + (
        " per shard" if plan.manual else "")
    for name, x in (("q", args[0]), ("k", args[1])):
      if (name == "k" or plan.q_seq) and x.shape[1] % n:
        raise ValueError(f"seq_axis={seq_axis!r}: {name}'s sequence length "
                         f"{x.shape[1]} is not divisible by {what} ({n}); pad the "
                         "sequence to a multiple of it.")
  return _jitted(fn, op, tuple(sorted(statics.items())), roles, plan, n_out)(*args)


def _prologue(q, k, v, scale, q_offset, implementation, op):
  impl = resolve_implementation(op, implementation,
                                q.shape[1] if hasattr(q, "shape") else None)
  _, lq, lk, _, _, d = _checks.check_qkv(q, k, v)
  _checks.check_q_offset(q_offset, lq, lk)
  return impl, _checks.check_scale(scale, d)


def dense_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *,
                    scale: float | None = None, q_offset: int | ArrayLike | None = None,
                    implementation: str | None = None, seq_axis: str | None = None,
                    seq_order: str = "contiguous") -> jax.Array:
  """Causal softmax attention over every earlier key.

  Args:
    q: `[batch, q_len, num_q_heads, head_dim]`.
    k, v: `[batch, kv_len, num_kv_heads, head_dim]`.
    scale: score scale, default `1 / sqrt(head_dim)`.
    q_offset: absolute position of `q[:, 0]` (default `kv_len - q_len`).
    implementation: see the module docstring.
    seq_axis: a mesh axis over which q, k, v are sharded along the sequence
      (context parallelism, `attn.context_parallel`; every op takes it), or
      None. Inputs sharded over batch and/or heads need nothing: the op runs
      per shard (`attn.sharding`). With q replicated over the axis and k, v
      sharded along the sequence (decode against a sharded cache), every
      shard gathers the cache and the output is replicated.
    seq_order: with `seq_axis`, the token order of the sharded sequence:
      `"contiguous"` (shard `s` holds the `s`-th block) or `"zigzag"`
      (balanced causal work: shard `s` holds chunks `s` and `2n-1-s` of `2n`;
      pass q, k, v permuted by `attn.context_parallel.zigzag_order` and get the
      output in that order; positions are those of the natural order).

  Returns:
    `[batch, q_len, num_q_heads, head_dim]`, dtype of `q`.
  """
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation, "dense_attention")
  return _call("dense_attention", q, k, v, q_offset, fn=IMPLEMENTATIONS["dense_attention"][impl],
               seq_axis=seq_axis, seq_order=seq_order,
               scale=scale)


def sliding_window_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, window: int,
                             scale: float | None = None,
                             q_offset: int | ArrayLike | None = None,
                             implementation: str | None = None,
                             seq_axis: str | None = None,
                             seq_order: str = "contiguous") -> jax.Array:
  """Causal sliding-window attention: query at `i` sees keys `[i - window + 1, i]`.

  `window` counts the query's own key (`window = 1`: only itself). Shapes and
  other arguments as in `dense_attention`. The `xla` path reads one
  contiguous slice of `block + window - 1` keys per query block: cost
  `O(L * window)`.
  """
  window = _checks.check_window(window)
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation,
                          "sliding_window_attention")
  return _call("sliding_window_attention", q, k, v, q_offset, fn=IMPLEMENTATIONS["sliding_window_attention"][impl],
               seq_axis=seq_axis, seq_order=seq_order,
               window=window, scale=scale)


def ppa_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, p: float, window: int = 64,
                  scale: float | None = None, q_offset: int | ArrayLike | None = None,
                  implementation: str | None = None, seq_axis: str | None = None,
                  seq_order: str = "contiguous") -> jax.Array:
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
  return _call("ppa_attention", q, k, v, q_offset, fn=IMPLEMENTATIONS["ppa_attention"][impl],
               seq_axis=seq_axis, seq_order=seq_order, p=p,
               window=window, scale=scale)


def block_sparse_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, layout: BlockLayout,
                           *, scale: float | None = None,
                           implementation: str | None = None, seq_axis: str | None = None,
                           seq_order: str = "contiguous") -> jax.Array:
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
  impl = resolve_implementation("block_sparse_attention", implementation)
  _, lq, lk, _, _, d = _checks.check_qkv(q, k, v)
  if seq_axis is not None and sharding.inside_shard_map():
    lq, lk = lq * jax.lax.axis_size(seq_axis), lk * jax.lax.axis_size(seq_axis)
  if (lq, lk) != (layout.q_len, layout.kv_len):
    raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len="
                     f"{layout.kv_len} but q has {lq} and k has {lk} positions; "
                     "build the layout for these lengths.")
  scale = _checks.check_scale(scale, d)
  if impl == "pallas" and layout.band is None:
    if implementation is None and not pallas.block_sparse.kernel_blocks_ok(layout):
      impl = "xla"                  # best available for this layout
    else:
      # ValueError early if the layout's blocks do not suit the kernels.
      pallas.block_sparse.host_tables(layout)
  return _call("block_sparse_attention", q, k, v, fn=IMPLEMENTATIONS["block_sparse_attention"][impl],
               seq_axis=seq_axis, seq_order=seq_order, layout=layout,
               scale=scale)


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


def superlinear_attention_with_anchors(q: ArrayLike, k: ArrayLike, v: ArrayLike,
                                       q_search: ArrayLike,
                                       k_search: ArrayLike | None = None, *,
                                       config: SuperlinearConfig = SuperlinearConfig(),
                                       scale: float | None = None,
                                       q_offset: int | ArrayLike | None = None,
                                       implementation: str | None = None,
                                       seq_axis: str | None = None,
                                       seq_order: str = "contiguous",
                                       remat: bool = False) -> SuperlinearOutput:
  """`superlinear_attention` that also returns the selected anchors and gates."""
  if not isinstance(config, SuperlinearConfig):
    raise ValueError(f"config must be an attn.SuperlinearConfig, got "
                     f"{type(config).__name__}.")
  if not isinstance(remat, bool):
    raise ValueError(f"remat={remat!r}: must be a bool (True: recompute span attention's "
                     "query chunks in the backward, less memory).")
  impl, scale = _prologue(q, k, v, scale, q_offset, implementation,
                          "superlinear_attention")
  k_search = _checks.check_search(q, k, q_search, k_search)
  # Only the Pallas prefill keeps per-chunk intermediates to recompute; the
  # xla path recomputes every query block in its backward anyway.
  extra = dict(remat_chunks=True) if remat and impl == "pallas" else {}
  return SuperlinearOutput(*_call("superlinear_attention", q, k, v, q_search, k_search,
                                  q_offset, fn=IMPLEMENTATIONS["superlinear_attention"][impl],
                                  seq_axis=seq_axis, seq_order=seq_order, n_out=3,
                                  config=config, scale=scale, **extra))


def superlinear_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, q_search: ArrayLike,
                          k_search: ArrayLike | None = None, *,
                          config: SuperlinearConfig = SuperlinearConfig(),
                          scale: float | None = None,
                          q_offset: int | ArrayLike | None = None,
                          implementation: str | None = None, seq_axis: str | None = None,
                          seq_order: str = "contiguous", remat: bool = False) -> jax.Array:
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
    remat: memory for time in the backward. With the Pallas kernels, a
      prefill of more than `attn.pallas.superlinear.SCAN_ABOVE` (128K)
      queries runs span attention in 64K-query chunks; `remat=True` keeps
      only each chunk's inputs and runs its forward again in the backward
      (a second span forward; temporaries of a 1M-token gradient, deviceless
      compiles: H100 32:8 79 -> 41 GB, v5p 8:2 21.9 -> 13.7 GiB;
      docs/kernels_span.md). No effect on shorter prefills, on decode calls
      or on the xla path (whose backward recomputes every query block
      anyway) and the reference.

  Returns:
    `[batch, q_len, num_q_heads, head_dim]`, dtype of `q`.
  """
  return superlinear_attention_with_anchors(
      q, k, v, q_search, k_search, config=config, scale=scale, q_offset=q_offset,
      implementation=implementation, seq_axis=seq_axis, seq_order=seq_order,
      remat=remat).out
