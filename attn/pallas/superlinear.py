"""Superlinear attention on the stripe and span kernels, or the decode kernels.

`superlinear_attention` has the signature of `attn.xla.superlinear_attention`
(plus `variant`, see `pallas_kernels.platform`). Decode rule: a call with
`q_len <= decode.MAX_QUERIES` runs `attn.pallas.decode.superlinear_attention`;
a longer one builds the shared integer tables from the `SuperlinearConfig`
(stripe and span tables of `attn.masks`) and runs:

1. `search` (stripe kernel): the top `num_spans` anchors per query head and
   their scores, best first;
2. `gate_logits`: the search's scores, differentiable through the chosen
   anchors (the only path into q_search / k_search; no second stripe pass),
   softmax over the valid slots (invalid slots -1e9, as the reference),
   taken inside span attention on its pair rows (`gates_from_logits`);
3. span attention (`pallas_kernels.span.span_attention`): window + spans,
   merged by log-sum-exp, mixed by the gates; gradients to q, k, v, gates.

Anchors, scores and gates travel as `[B, Hq, K, Lq]` (query axis last) from
the search to the span kernels and are transposed to the public
`[B, Lq, Hq, K]` only on return: on TPU, reshapes of tables whose tiny axes
(G heads, K slots) follow the query axis compile to code linear in `Lq`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attn import masks, sharding
from attn._offsets import call_any_offset
from attn.config import SuperlinearConfig
from attn.pallas import decode
from pallas_kernels import platform, span, stripe

OPS = ("superlinear_attention",)


def supported(backend: str, q_len: int | None = None) -> bool:
  """Whether the kernels a call with `q_len` queries runs have a record for `backend`.

  The prefill path runs the stripe search and the span kernels: a backend
  counts only where both families have a record.
  """
  if q_len is not None and q_len <= decode.MAX_QUERIES:
    return decode.supported(backend)
  return (platform.verified_on(span.HARDWARE_CHECKS, backend)
          and platform.verified_on(stripe.HARDWARE_CHECKS, backend))


def search(q_search, k_search, q_offset, *, config: SuperlinearConfig, variant=None,
           heads_first: bool = False):
  """Top-`num_spans` anchors and scores per query head (stripe kernels).

  Scores the stripe anchors of `attn.masks.superlinear_stripe_table` (far to
  near). q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]`; q_offset:
  None (`Lk - Lq`), an int or a traced int32 scalar. Returns `(anchors int32
  [B, Lq, Hq, K], scores float32 [B, Lq, Hq, K])` (`[B, Hq, K, Lq]` with
  `heads_first`), best first, `-1`/`-inf` in empty slots; equal to the
  reference op's anchors.
  """
  lq, lk = q_search.shape[1], k_search.shape[1]
  table = masks.superlinear_stripe_table(lk, config)
  return stripe.search_topk(q_search, k_search, table, num_spans=config.num_spans,
                            q_offset=lk - lq if q_offset is None else q_offset,
                            variant=variant, heads_first=heads_first)


def _gather_rows(kt, idx):
  """`kt [B, Hk, Lk, Ds]`, `idx int32 [B, Hk, G, Lq]` -> `[B, Hk, G, Lq, Ds]`."""
  b, hk, g, lq = idx.shape
  rows = jnp.take_along_axis(kt, idx.reshape(b, hk, g * lq)[..., None], axis=2)
  return rows.reshape(b, hk, g, lq, kt.shape[-1])


def _scatter_add_rows(dk, idx, upd):
  """`dk [B, Hk, Lk, Ds] += upd [B, Hk, G, Lq, Ds]` at rows `idx [B, Hk, G, Lq]`."""
  b, hk, g, lq = idx.shape
  add = lambda z, i, u: z.at[i].add(u)  # noqa: E731
  return jax.vmap(jax.vmap(add))(dk, idx.reshape(b, hk, g * lq),
                                 upd.reshape(b, hk, g * lq, upd.shape[-1]))


@jax.custom_vjp
def gate_logits(q_search, k_search, anchors, scores):
  """float32 `[B, Hq, K, Lq]`: `<q_search, k_search[anchor]>`, 0 in empty slots.

  Search once: the forward returns the search's own top-k `scores` (the same
  dots), no second pass over the stripes. The backward differentiates
  through the `K` chosen anchors only: `dq_search` sums the `K` gathered
  search-key rows, `dk_search` scatter-adds `K` query rows per query (one
  slot and `GATE_ROWS` rows at a time in a loop, so the temporaries and the
  compiled code are sized by the step, not by `Lq`).

  q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]`; anchors int32 and
  scores float32 `[B, Hq, K, Lq]` (from `search(..., heads_first=True)`).
  """
  return jnp.where(anchors >= 0, scores, 0.0).astype(jnp.float32)


def _gate_fwd(q_search, k_search, anchors, scores):
  return gate_logits(q_search, k_search, anchors, scores), (q_search, k_search, anchors)


# Queries (of one query head and one slot) per step of the gate backward's
# loop: each step gathers and scatter-adds this many search-key rows, so the
# scatter's sort (XLA:TPU sorts a scatter's indices) and its code are sized
# by the step, not by L. 4096 rows: XLA:TPU's sort of the step's
# `B * Hk * GATE_ROWS` indices compiles in about a second; 16384 rows took
# 3-4 s of the superlinear grad's ~30 s (docs/kernels_span.md, fifth pass).
GATE_ROWS = 1 << 12


def _gate_bwd(res, ct):
  qs, ks, anchors = res
  b, lq, hq, ds = qs.shape
  lk, hk = ks.shape[1], ks.shape[2]
  g, num = hq // hk, anchors.shape[2]
  f32 = jnp.float32
  step = min(GATE_ROWS, lq)
  steps = -(-lq // step)
  lqp = steps * step
  pad_q = lambda x, axis: jnp.pad(  # noqa: E731  zero queries appended on `axis`
      x, [(0, lqp - lq) if a == axis % x.ndim else (0, 0) for a in range(x.ndim)])

  # Steps slice the query axis of the tables as they are ([B, Hk, G, K, Lq],
  # query axis last): no table is flattened (on TPU, merging the tiny G / K
  # axes into the query axis compiles to code linear in Lq).
  ct = pad_q(jnp.where(anchors >= 0, ct, 0.0).astype(f32), -1).reshape(b, hk, g, num, lqp)
  idx = pad_q(jnp.clip(anchors, 0, lk - 1), -1).reshape(b, hk, g, num, lqp)
  qh = pad_q(qs.transpose(0, 2, 1, 3).astype(f32), 2).reshape(b, hk, g, lqp, ds)
  kt = ks.transpose(0, 2, 1, 3)

  def body(t, acc):
    dq, dk = acc
    j, i, c = t // (g * steps), (t // steps) % g, t % steps
    at = (0, 0, i, j, c * step)
    i_t = jax.lax.dynamic_slice(idx, at, (b, hk, 1, 1, step)).reshape(b, hk, 1, step)
    c_t = jax.lax.dynamic_slice(ct, at, (b, hk, 1, 1, step)).reshape(b, hk, 1, step, 1)
    at_q = (0, 0, i, c * step, 0)
    q_t = jax.lax.dynamic_slice(qh, at_q, (b, hk, 1, step, ds))
    d_t = jax.lax.dynamic_slice(dq, at_q, (b, hk, 1, step, ds))
    d_t = d_t + c_t * _gather_rows(kt, i_t).astype(f32)
    dq = jax.lax.dynamic_update_slice(dq, d_t, at_q)
    return dq, _scatter_add_rows(dk, i_t, c_t * q_t)

  zeros = (jnp.zeros((b, hk, g, lqp, ds), f32), jnp.zeros((b, hk, lk, ds), f32))
  # Inside a shard_map with check_vma the carry varies like the inputs.
  axes = tuple(sorted(frozenset().union(*map(sharding.varying_axes, (qs, ks, anchors, ct)))))
  if axes:
    zeros = jax.lax.pcast(zeros, axes, to="varying")
  dq, dk = jax.lax.fori_loop(0, num * g * steps, body, zeros)
  dq = dq[:, :, :, :lq].reshape(b, hq, lq, ds).transpose(0, 2, 1, 3).astype(qs.dtype)
  dk = dk.transpose(0, 2, 1, 3).astype(ks.dtype)
  return dq, dk, None, None


gate_logits.defvjp(_gate_fwd, _gate_bwd)


def _prefill(q, k, v, q_search, k_search, q_offset, *, config: SuperlinearConfig, scale,
             variant, block_q, block_k):
  lq, lk = q.shape[1], k.shape[1]
  q_offset = lk - lq if q_offset is None else q_offset
  # [B, Hq, K, Lq] from the search to the span kernels (query axis last).
  anchors, scores = search(jax.lax.stop_gradient(q_search), jax.lax.stop_gradient(k_search),
                           q_offset, config=config, variant=variant, heads_first=True)
  anchors, scores = jax.lax.stop_gradient(anchors), jax.lax.stop_gradient(scores)
  logits = gate_logits(q_search, k_search, anchors, scores)
  span_table = masks.superlinear_span_table(lk, config)   # numpy: static cost estimates
  # Softmax over the slots (invalid slots -1e9) inside span attention, on
  # its slot-major pair rows.
  out, gates = span.span_attention(
      q, k, v, anchors, jnp.where(anchors >= 0, logits, -1e9), span_table=span_table,
      window=config.window, scale=scale, q_offset=q_offset, block_q=block_q,
      block_k=block_k, variant=variant, gates_from_logits=True)
  public = lambda x: x.transpose(0, 3, 1, 2)  # noqa: E731  [B, Hq, K, Lq] -> [B, Lq, Hq, K]
  return out, public(anchors).astype(jnp.int32), public(gates).astype(jnp.float32)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, variant=None,
                          block_q=None, block_k=None):
  """Superlinear attention with Pallas kernels; see `attn.superlinear_attention`.

  `block_q`, `block_k`: span kernel tiles of the prefill path (None = per
  platform). Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32,
  gates [B, Lq, Hq, K] float32)`.
  """
  if q.shape[1] <= decode.MAX_QUERIES:
    return decode.superlinear_attention(q, k, v, q_search, k_search, q_offset,
                                        config=config, scale=scale, variant=variant)
  return call_any_offset(_prefill, q, k, v, q_search, k_search, q_offset,
                         query_args=(0, 3), fills=(0, -1, 0), config=config, scale=scale,
                         variant=variant, block_q=block_q, block_k=block_k)
