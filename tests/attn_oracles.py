"""Independent, obviously-correct numpy loop oracles for tiny shapes.

Nothing here imports `attn`: the offsets and spans are recomputed from the
definitions with plain Python integers (exact rational powers, no float
`pow` tables), one query and one head at a time.

Row convention shared with the ops (docs/superlinear.md, README): query `i`
sits at absolute position `q_offset + i`; a query whose position lies outside
`[0, kv_len)` has no key of its own and returns a zero row.
"""

from __future__ import annotations

import fractions
import math

import numpy as np


def _ratio(p: float) -> tuple[int, int]:
  """`p` as an exact fraction `a / b` (small denominators: 0.55 = 11/20)."""
  fr = fractions.Fraction(p).limit_denominator(1000)
  assert abs(float(fr) - p) < 1e-12, p
  return fr.numerator, fr.denominator


def int_floor_power(j: int, p: float) -> int:
  """`floor(j ** (1/p))` exactly: the largest `r` with `r**a <= j**b`, p = a/b."""
  a, b = _ratio(p)
  target = j ** b
  r = int(round(j ** (b / a)))
  while r ** a > target:
    r -= 1
  while (r + 1) ** a <= target:
    r += 1
  return r


def int_ceil_power(s: int, p: float) -> int:
  """`ceil(s ** (1/p))` exactly: the smallest `d` with `d**a >= s**b`, p = a/b."""
  a, b = _ratio(p)
  target = s ** b
  d = max(int(round(s ** (b / a))), 1)
  while d > 1 and (d - 1) ** a >= target:
    d -= 1
  while d ** a < target:
    d += 1
  return d


def _softmax_attend(qrow, keys, vals, scale):
  s = np.array([scale * float(np.dot(qrow, kk)) for kk in keys], np.float64)
  if s.size == 0:
    return np.zeros(vals.shape[-1])
  w = np.exp(s - s.max())
  w /= w.sum()
  return (w[:, None] * vals).sum(0)


def attention_loop(q, k, v, keep, *, scale=None, q_offset=None):
  """`keep(qpos, kpos) -> bool`; q: [B, Lq, Hq, D], k, v: [B, Lk, Hk, D].

  Query `i` at position `pos = q_offset + i` attends the keys `j <= pos`
  with `keep(pos, j)`; a query at `pos < 0` or `pos >= kv_len` gets zeros.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q_offset = lk - lq if q_offset is None else int(q_offset)
  out = np.zeros((b, lq, hq, v.shape[-1]))
  for bi in range(b):
    for h in range(hq):
      kh = h // (hq // hk)
      for i in range(lq):
        pos = q_offset + i
        if not 0 <= pos < lk:
          continue
        idx = [j for j in range(lk) if j <= pos and keep(pos, j)]
        out[bi, i, h] = _softmax_attend(q[bi, i, h], k[bi, idx, kh], v[bi, idx, kh], scale)
  return out


def ppa_kept_offsets(max_offset: int, p: float, window: int) -> set[int]:
  """Kept offsets in `[0, max_offset]`: `d < window` or `d = ceil(s**(1/p))`, s >= 1."""
  kept = set(range(min(window, max_offset + 1)))
  if p == 0:
    return kept
  if p == 1:
    return set(range(max_offset + 1))
  s = 1
  while True:
    d = int_ceil_power(s, p)
    if d > max_offset:
      return kept
    kept.add(d)
    s += 1


def ppa_kept_offset(d: int, p: float, window: int) -> bool:
  """Offset `d >= 0` kept iff `d < window` or `d = ceil(s**(1/p))`, s >= 1."""
  return d in ppa_kept_offsets(d, p, window)


def ppa_keep(p: float, window: int, max_offset: int):
  """`keep(pos, j)` for `attention_loop` (offsets up to `max_offset`)."""
  kept = ppa_kept_offsets(max_offset, p, window)
  return lambda pos, j: (pos - j) in kept


def superlinear_loop(q, k, v, qs, ks, *, sw_index, num_spans, search_power,
                     span_power, backward_factor, forward_factor, q_offset=None):
  """Superlinear attention for one query and head at a time (float64).

  `f(j) = floor(j ** (1/search_power))` in exact integer arithmetic (any
  rational `search_power`, e.g. 0.55 = 11/20). Returns `(out, anchors)`;
  rows whose position lies outside `[0, kv_len)` get zeros and anchors -1.
  """
  f = lambda j: int_floor_power(j, search_power)  # noqa: E731
  q, k, v, qs, ks = (np.asarray(x, np.float64) for x in (q, k, v, qs, ks))
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5
  q_offset = lk - lq if q_offset is None else int(q_offset)
  window = f(sw_index + 1) - 1
  out = np.zeros((b, lq, hq, d))
  anchors_out = np.full((b, lq, hq, num_spans), -1)
  for bi in range(b):
    for h in range(hq):
      kh = h // (hq // hk)
      for i in range(lq):
        pos = q_offset + i
        if not 0 <= pos < lk:
          continue
        t = pos + 1
        win = list(range(max(pos - window + 1, 0), pos + 1))
        cands = []  # (score, anchor), near to far
        j = sw_index + 1
        while t - f(j) >= 0:
          cands.append((float(np.dot(qs[bi, i, h], ks[bi, t - f(j), kh])), t - f(j)))
          j += 1
        cands.reverse()  # far to near
        # Highest score first; on ties the farther stripe (earlier in list).
        order = sorted(range(len(cands)), key=lambda c: -cands[c][0])[:num_spans]
        chosen = [cands[c] for c in order]
        back = math.ceil(backward_factor * t ** span_power - 1e-9)
        fwd = math.ceil(forward_factor * t ** span_power - 1e-9)
        outs, logits = [], []
        for score, a in chosen:
          span = range(max(a - back, 0), min(a + fwd, pos - window) + 1)
          idx = sorted(set(span) | set(win))
          outs.append(_softmax_attend(q[bi, i, h], k[bi, idx, kh], v[bi, idx, kh], scale))
          logits.append(score)
        while len(outs) < num_spans:   # no valid anchor: window attention
          outs.append(_softmax_attend(q[bi, i, h], k[bi, win, kh], v[bi, win, kh], scale))
          logits.append(-1e9)
        logits = np.array(logits)
        g = np.exp(logits - logits.max())
        g /= g.sum()
        out[bi, i, h] = sum(gi * oi for gi, oi in zip(g, outs))
        for slot, (_, a) in enumerate(chosen):
          anchors_out[bi, i, h, slot] = a
  return out, anchors_out


# ------------------------------------------ dense masked jnp oracles (grads)


def keep_mask(keep, q_len: int, kv_len: int, q_offset=None) -> np.ndarray:
  """bool `[q_len, kv_len]`: query `i` (position `q_offset + i`) sees key `j`
  iff `j <= pos` and `keep(pos, j)`; rows at positions outside `[0, kv_len)`
  see nothing (the same rule as `attention_loop`)."""
  q_offset = kv_len - q_len if q_offset is None else int(q_offset)
  mask = np.zeros((q_len, kv_len), bool)
  for i in range(q_len):
    pos = q_offset + i
    if 0 <= pos < kv_len:
      mask[i, :pos + 1] = [keep(pos, j) for j in range(pos + 1)]
  return mask


def masked_attention(q, k, v, mask, *, scale=None):
  """Dense softmax attention in float32 jnp (differentiable), GQA by
  repeating kv heads. `mask`: bool broadcastable to `[b, hq, lq, lk]`; a row
  with no visible key is zero. q: [b, lq, hq, d], k, v: [b, lk, hk, d]."""
  import jax.numpy as jnp
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  mask = jnp.asarray(mask)
  s = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = p.sum(-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(denom > 0, denom, 1.0), v)


def superlinear_slot_masks(anchors, kv_len: int, *, sw_index, search_power, span_power,
                           backward_factor, forward_factor, q_offset=None, **_):
  """bool `[b, hq, num_spans, lq, kv_len]`: the keys slot `s` of each query
  attends (its span together with the window; the window alone for an empty
  slot, anchor -1), from `anchors` `[b, lq, hq, num_spans]` (e.g. those of
  `superlinear_loop`), with this module's own integer arithmetic."""
  anchors = np.asarray(anchors)
  b, lq, hq, num = anchors.shape
  q_offset = kv_len - lq if q_offset is None else int(q_offset)
  window = int_floor_power(sw_index + 1, search_power) - 1
  out = np.zeros((b, hq, num, lq, kv_len), bool)
  for i in range(lq):
    pos = q_offset + i
    if not 0 <= pos < kv_len:
      continue
    t = pos + 1
    back = math.ceil(backward_factor * t ** span_power - 1e-9)
    fwd = math.ceil(forward_factor * t ** span_power - 1e-9)
    out[:, :, :, i, max(pos - window + 1, 0):pos + 1] = True
    for bi, h, s in zip(*np.nonzero(anchors[:, i] >= 0)):
      a = int(anchors[bi, i, h, s])
      out[bi, h, s, i, max(a - back, 0):max(min(a + fwd, pos - window) + 1, 0)] = True
  return out


def superlinear_dense(q, k, v, qs, ks, anchors, slot_masks):
  """Superlinear attention in float32 jnp for fixed `anchors` (differentiable
  in q, k, v, qs, ks): gates = softmax over the slots of the unscaled search
  dots `<qs_i, ks[anchor]>` (-1e9 for an empty slot), output = gated sum of
  one masked softmax per slot (`slot_masks` of `superlinear_slot_masks`)."""
  import jax.numpy as jnp
  anchors = np.asarray(anchors)
  b, lq, hq, num = anchors.shape
  rep = hq // ks.shape[2]
  kh = np.arange(hq) // rep
  idx_b = np.arange(b)[:, None, None, None]
  picked = jnp.asarray(ks, jnp.float32)[idx_b, np.maximum(anchors, 0), kh[None, None, :, None]]
  logits = jnp.einsum("bqhd,bqhsd->bqhs", jnp.asarray(qs, jnp.float32), picked)
  gates = jax_softmax(jnp.where(anchors >= 0, logits, -1e9))
  outs = jnp.stack([masked_attention(q, k, v, slot_masks[:, :, s]) for s in range(num)], -2)
  return jnp.sum(gates[..., None] * outs, axis=-2)


def jax_softmax(x):
  import jax.numpy as jnp
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)
