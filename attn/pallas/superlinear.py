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


@jax.custom_vjp
def gate_logits(q_search, k_search, anchors, scores):
  """float32 `[B, Hq, K, Lq]`: `<q_search, k_search[anchor]>`, 0 in empty slots.

  Search once: the forward returns the search's own top-k `scores` (the same
  dots), no second pass over the stripes. The backward differentiates
  through the `K` chosen anchors only: `dq_search` sums the `K` gathered
  search-key rows, `dk_search` scatter-adds `K` query rows per query (about
  `GATE_ROWS` rows at a time in a loop, so the temporaries and the compiled
  code are sized by the step, not by `Lq`).

  q_search: `[B, Lq, Hq, Ds]`; k_search: `[B, Lk, Hk, Ds]`; anchors int32 and
  scores float32 `[B, Hq, K, Lq]` (from `search(..., heads_first=True)`).
  """
  return jnp.where(anchors >= 0, scores, 0.0).astype(jnp.float32)


def _gate_fwd(q_search, k_search, anchors, scores):
  return gate_logits(q_search, k_search, anchors, scores), (q_search, k_search, anchors)


# Search-key rows per step of the gate backward's loop (all query heads and
# K slots of a power of two of queries, at most `GATE_ROWS / (Hq K)`): each
# step gathers and scatter-adds this many rows, so the scatter's sort
# (XLA:TPU sorts a scatter's indices) and its code are sized by the step,
# not by L. XLA:TPU sorts 8192 indices in about a second of compile; 32768
# took 3-4 s of the superlinear grad's ~30 s (docs/kernels_span.md, fifth
# pass).
GATE_ROWS = 1 << 13


def _gate_bwd(res, ct):
  qs, ks, anchors = res
  b, lq, hq, ds = qs.shape
  lk, hk = ks.shape[1], ks.shape[2]
  g, num = hq // hk, anchors.shape[2]
  f32 = jnp.float32
  step = min(1 << max(0, (GATE_ROWS // (hq * num)).bit_length() - 1), lq)
  steps = -(-lq // step)
  lqp = steps * step
  pad_q = lambda x, axis: jnp.pad(  # noqa: E731  zero queries appended on `axis`
      x, [(0, lqp - lq) if a == axis % x.ndim else (0, 0) for a in range(x.ndim)])

  # A step is `step` queries of every query head and slot, sliced from the
  # [B, Hq, K, Lq] tables as they are (query axis last; no reshape: on TPU,
  # splitting or merging the tiny head / slot axes relays the table out in
  # code linear in Lq). Its dq_search rows are complete in the step (summed
  # in float32, stored once in q_search's dtype); q_search stays in its
  # dtype. Rows of kv head `h // G` are gathered and scatter-added by
  # (batch, kv head, row) indices.
  ct = pad_q(jnp.where(anchors >= 0, ct, 0.0).astype(f32), -1)
  idx = pad_q(jnp.clip(anchors, 0, lk - 1), -1)
  qh = pad_q(qs.transpose(0, 2, 1, 3), 2)                         # [B, Hq, Lq, Ds]
  kt = ks.transpose(0, 2, 1, 3)                                    # [B, Hk, Lk, Ds]
  bi = jnp.arange(b)[:, None, None, None]
  hi = (jnp.arange(hq) // g)[None, :, None, None]

  def body(c, acc):
    dq, dk = acc
    at = (0, 0, 0, c * step)
    i_t = jax.lax.dynamic_slice(idx, at, (b, hq, num, step))
    c_t = jax.lax.dynamic_slice(ct, at, (b, hq, num, step))[..., None]
    q_t = jax.lax.dynamic_slice(qh, (0, 0, c * step, 0), (b, hq, step, ds)).astype(f32)
    rows = kt.at[bi, hi, i_t].get(mode="promise_in_bounds").astype(f32)  # [B, Hq, K, s, Ds]
    d_t = jnp.sum(c_t * rows, axis=2)
    dq = jax.lax.dynamic_update_slice(dq, d_t.astype(dq.dtype), (0, 0, c * step, 0))
    return dq, dk.at[bi, hi, i_t].add(c_t * q_t[:, :, None], mode="promise_in_bounds")

  zeros = (jnp.zeros((b, hq, lqp, ds), qs.dtype), jnp.zeros((b, hk, lk, ds), f32))
  # Inside a shard_map with check_vma the carry varies like the inputs.
  axes = tuple(sorted(frozenset().union(*map(sharding.varying_axes, (qs, ks, anchors, ct)))))
  if axes:
    zeros = jax.lax.pcast(zeros, axes, to="varying")
  dq, dk = jax.lax.fori_loop(0, steps, body, zeros)
  dq = dq[:, :, :lq].transpose(0, 2, 1, 3)
  dk = dk.transpose(0, 2, 1, 3).astype(ks.dtype)
  return dq, dk, None, None


gate_logits.defvjp(_gate_fwd, _gate_bwd)


# Queries per step of span attention's scan over the query axis
# (`span.span_attention(query_chunk=...)`) for prefills of more than
# `SCAN_ABOVE` queries: the pair rows, their sort and the kernels' row tables
# are sized by the chunk, so TPU compile time and the temporaries stop
# growing with L past it. Up to 128K queries the scan costs more compile
# time than it saves (v5p grad at 128K: 48-55 s with two chunks, 39-44 s
# without; docs/kernels_span.md, sixth pass).
QUERY_CHUNK = 1 << 16
SCAN_ABOVE = 1 << 17


def _prefill(q, k, v, q_search, k_search, q_offset, *, config: SuperlinearConfig, scale,
             variant, block_q, block_k, query_chunk, remat_chunks):
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
      block_k=block_k, variant=variant, gates_from_logits=True, query_chunk=query_chunk,
      remat_chunks=remat_chunks)
  public = lambda x: x.transpose(0, 3, 1, 2)  # noqa: E731  [B, Hq, K, Lq] -> [B, Lq, Hq, K]
  return out, public(anchors).astype(jnp.int32), public(gates).astype(jnp.float32)


def superlinear_attention(q, k, v, q_search, k_search, q_offset=None, *,
                          config: SuperlinearConfig, scale, variant=None,
                          block_q=None, block_k=None, query_chunk="auto",
                          remat_chunks: bool = False):
  """Superlinear attention with Pallas kernels; see `attn.superlinear_attention`.

  `block_q`, `block_k`: span kernel tiles of the prefill path (None = per
  platform). `query_chunk`: queries per step of span attention's scan over
  the query axis (None: all at once; "auto": `QUERY_CHUNK` for more than
  `SCAN_ABOVE` queries). `remat_chunks`: recompute each chunk's forward in
  the backward (`span.span_attention`: less memory, a second span forward).
  Returns `(out [B, Lq, Hq, D], anchors [B, Lq, Hq, K] int32, gates [B, Lq,
  Hq, K] float32)`.
  """
  if query_chunk == "auto":
    query_chunk = QUERY_CHUNK if q.shape[1] > SCAN_ABOVE else None
  if q.shape[1] <= decode.MAX_QUERIES:
    return decode.superlinear_attention(q, k, v, q_search, k_search, q_offset,
                                        config=config, scale=scale, variant=variant)
  return call_any_offset(_prefill, q, k, v, q_search, k_search, q_offset,
                         query_args=(0, 3), fills=(0, -1, 0), config=config, scale=scale,
                         variant=variant, block_q=block_q, block_k=block_k,
                         query_chunk=query_chunk, remat_chunks=remat_chunks)
