"""PPA on the stripe and block-sparse kernels (prefill) and the decode kernels.

`ppa_attention` has the signature of `attn.xla.ppa_attention` (plus
`variant`, see `pallas_kernels.platform`).

* Decode: a call with `q_len <= decode.MAX_QUERIES` runs
  `attn.pallas.decode.ppa_attention`.
* Prefill at the default `q_offset` (None: the queries are the last
  positions) runs `routed_prefill`: each query block takes the path
  `attn.ppa_routing.ppa_routing` picks (fewer bytes loaded): the stripe
  kernels, or the block-sparse kernels with the block's PPA mask as
  per-tile masks (`attn.ppa_routing.ppa_layout`). At most two kernel
  calls (tiles for the first blocks, stripes for the last); their outputs
  are concatenated in query order, so gradients flow through both. When
  the call targets the compiled TPU kernels
  (`pallas_kernels.platform.targets_tpu`, decided at trace time), the
  routing also keeps the routed call's tables within SMEM (`SmemBudget`):
  the TPU block-sparse kernels scalar-prefetch each pass's whole tables, so
  past that budget the remaining blocks run the stripes instead of being
  refused.
* Prefill at a traced `q_offset` runs the stripe kernels on every block
  (the routing and the tile masks depend on the positions).

The stripe kernels get the kept offsets of `attn.masks.ppa_offsets` split by
`attn.masks.ppa_dense_runs` into dense runs (matmul tiles: the window, and
everything at `p = 1`) and sparse far offsets (one stripe each), cut at the
last query position of the call (its keys stop there).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attn import masks, ppa_routing
from attn._offsets import call_any_offset
from attn.pallas import block_sparse, decode
from pallas_kernels import platform, stripe
from pallas_kernels.block_sparse import tpu as block_sparse_tpu

OPS = ("ppa_attention",)


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the kernels a call with `q_len` queries runs have a record for `backend`."""
  if q_len is not None and q_len <= decode.MAX_QUERIES:
    return decode.supported(backend)
  return (platform.verified_on(stripe.HARDWARE_CHECKS, backend)
          and block_sparse.supported(backend))


@dataclasses.dataclass(frozen=True)
class SmemBudget:
  """Table budget of the compiled TPU block-sparse kernels, for
  `attn.ppa_routing.ppa_routing(fits=...)`: a routed call fits when its
  forward / dq tables (`[num_q_blocks, width]`) and its dkv tables
  (`[num_k_blocks, width_t]`) each take at most `max_bytes` of SMEM
  (`pallas_kernels.block_sparse.tpu.table_bytes`; default: what
  `tpu.check_smem` accepts)."""

  max_bytes: int = block_sparse_tpu.SMEM_BUDGET

  def __call__(self, shape: ppa_routing.TableShape) -> bool:
    mode = "band" if shape.band else "table"
    return max(block_sparse_tpu.table_bytes(mode, shape.num_q_blocks, shape.width),
               block_sparse_tpu.table_bytes(mode, shape.num_k_blocks, shape.width_t)
               ) <= self.max_bytes


def _split(kv_len, p, window):
  """`(dense_runs, far_offsets)` of the kept offsets in `[0, kv_len - 1]`."""
  return masks.ppa_dense_runs(masks.ppa_offsets(kv_len - 1, p=p, window=min(window, kv_len)))


def _stripes(q, k, v, q_offset, *, runs, far, scale, variant):
  """Stripe kernels for queries at `q_offset + i` (None: `kv_len - q_len`);
  `runs`, `far` are cut at the last key."""
  last = k.shape[1] - 1
  runs = tuple((lo, min(hi, last)) for lo, hi in runs if lo <= last)
  return stripe.ppa_attention(q, k, v, dense_runs=runs, far_offsets=far[far <= last],
                              scale=scale,
                              q_offset=k.shape[1] - q.shape[1] if q_offset is None else q_offset,
                              variant=variant)


def routed_prefill(q, k, v, *, p, window, scale, variant=None, block_q=None, block_k=None,
                   table_budget=None):
  """PPA of the last `q_len` positions, each query block on its routed path.

  Args:
    q: `[B, Lq, Hq, D]`; k, v: `[B, Lk, Hk, D]`, `Lq <= Lk`.
    p, window, scale: as in `attn.ppa_attention`.
    variant: see `pallas_kernels.platform`.
    block_q, block_k: routing tiles (powers of two >= 16; default
      `attn.ppa_routing.default_block` of each length).
    table_budget: the routing's `fits` (a `SmemBudget`, say); None:
      `SmemBudget()` when the call targets the compiled TPU kernels
      (`pallas_kernels.platform.targets_tpu(variant)`), else no budget.

  Returns:
    `[B, Lq, Hq, D]` like `q`; differentiable.
  """
  lq, lk = q.shape[1], k.shape[1]
  hq, hk = q.shape[2], k.shape[2]
  bq = ppa_routing.default_block(lq) if block_q is None else block_q
  bk = ppa_routing.default_block(lk) if block_k is None else block_k
  if table_budget is None and platform.targets_tpu(variant):
    table_budget = SmemBudget()
  plan = ppa_routing.ppa_routing(lq, lk, p=p, window=window, block_q=bq, block_k=bk,
                                 group=hq // hk, head_dim=k.shape[-1],
                                 itemsize=jnp.dtype(k.dtype).itemsize, fits=table_budget)
  qoff = lk - lq
  runs, far = _split(lk, p, window)
  outs = []
  for r0, r1, routed in plan.segments():
    end = qoff + r1                       # keys past the segment's last query: unseen
    qs, ks, vs = q[:, r0:r1], k[:, :end], v[:, :end]
    if routed:
      layout = ppa_routing.ppa_layout(r1 - r0, end, q_offset=qoff + r0, p=p, window=window,
                                      block_q=bq, block_k=bk)
      outs.append(block_sparse.block_sparse_attention(qs, ks, vs, layout=layout, scale=scale,
                                                      variant=variant))
    else:
      outs.append(_stripes(qs, ks, vs, qoff + r0, runs=runs, far=far, scale=scale,
                           variant=variant))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _prefill(q, k, v, q_offset, *, p, window, scale, variant):
  if q_offset is None:
    return routed_prefill(q, k, v, p=p, window=window, scale=scale, variant=variant)
  runs, far = _split(k.shape[1], p, window)
  return _stripes(q, k, v, q_offset, runs=runs, far=far, scale=scale, variant=variant)


def ppa_attention(q, k, v, q_offset=None, *, p, window, scale, variant=None):
  """PPA with the Pallas kernels; arguments as in `attn.xla.ppa_attention`."""
  if q.shape[1] <= decode.MAX_QUERIES:
    return decode.ppa_attention(q, k, v, q_offset, p=p, window=window, scale=scale,
                                variant=variant)
  return call_any_offset(_prefill, q, k, v, q_offset, query_args=(0,), fills=(0,), p=p,
                         window=window, scale=scale, variant=variant)
