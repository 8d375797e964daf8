"""The merge-and-gate epilogue of span attention, with its own VJP.

`out_r = c_w[r] O_w[r] + sum_k c_k[r] O_p[inv[k R + r]]`: the window output
and the `K` span outputs of each (head, query) row, mixed by per-row weights
(`common.gate_merge_weights`). The span outputs stay in the kernels' sorted
pair order and are gathered by `inv` here, in the forward and again in the
backward, so the only saved arrays are the ones the interval kernels' own
VJPs save anyway (`O_w`, `O_p`) plus the `[B, H, R]` weights and the two
permutations. Differentiating the plain jnp expression instead saves the
float32 products' operands: at 1M tokens, 8 query / 2 kv heads, head_dim
128, that was 12 GiB of float32 `[G L, D]` copies per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32
from pallas_kernels.span.common import gather_rows


def _slot(inv, k: int, r: int):
  return jax.lax.slice_in_dim(inv, k * r, (k + 1) * r, axis=inv.ndim - 1)


@jax.custom_vjp
def mix_rows(o_w, o_p, perm, inv, c_w, c_s):
  """Mixed output `[B, H, R, D]` in `o_w`'s dtype (float32 sums).

  Args:
    o_w: `[B, H, R, D]` window outputs, rows (head, query).
    o_p: `[B, H, K R, D]` span outputs in the kernels' (sorted) row order.
    perm, inv: int32 `[B, H, K R]`: sorted row `p` is slot-major row
      `perm[p]` (slot `perm[p] // R`, row `perm[p] % R`); `inv` the inverse.
    c_w: float32 `[B, H, R]`; c_s: a tuple of `K` float32 `[B, H, R]`.
  """
  r = o_w.shape[2]
  out = c_w[..., None] * o_w.astype(F32)
  for k, c in enumerate(c_s):
    out = out + c[..., None] * gather_rows(o_p, _slot(inv, k, r), -2).astype(F32)
  return out.astype(o_w.dtype)


def _mix_fwd(o_w, o_p, perm, inv, c_w, c_s):
  return mix_rows(o_w, o_p, perm, inv, c_w, c_s), (o_w, o_p, perm, inv, c_w, c_s)


def _mix_bwd(res, ct):
  o_w, o_p, perm, inv, c_w, c_s = res
  r = o_w.shape[2]
  ctf = ct.astype(F32)
  dc_w = jnp.sum(ctf * o_w.astype(F32), axis=-1)
  do_w = (c_w[..., None] * ctf).astype(o_w.dtype)
  dc_s = tuple(jnp.sum(ctf * gather_rows(o_p, _slot(inv, k, r), -2).astype(F32), axis=-1)
               for k in range(len(c_s)))
  # Sorted row p gets c[perm[p]] * ct[perm[p] % R].
  c_p = gather_rows(jnp.concatenate(c_s, axis=-1), perm, -1)
  do_p = (gather_rows(ct, perm % r, -2).astype(F32) * c_p[..., None]).astype(o_p.dtype)
  return do_w, do_p, None, None, dc_w, dc_s


mix_rows.defvjp(_mix_fwd, _mix_bwd)
