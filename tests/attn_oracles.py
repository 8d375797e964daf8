"""Independent, obviously-correct numpy loop oracles for tiny shapes.

Nothing here imports `attn`: the offsets and spans are recomputed from the
definitions with plain Python integers, one query and one head at a time.
"""

from __future__ import annotations

import math

import numpy as np


def _softmax_attend(qrow, keys, vals, scale):
  s = np.array([scale * float(np.dot(qrow, kk)) for kk in keys], np.float64)
  if s.size == 0:
    return np.zeros(vals.shape[-1])
  w = np.exp(s - s.max())
  w /= w.sum()
  return (w[:, None] * vals).sum(0)


def attention_loop(q, k, v, keep, *, scale=None, q_offset=None):
  """`keep(qpos, kpos) -> bool`; q: [B, Lq, Hq, D], k, v: [B, Lk, Hk, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q_offset = lk - lq if q_offset is None else q_offset
  out = np.zeros((b, lq, hq, v.shape[-1]))
  for bi in range(b):
    for h in range(hq):
      kh = h // (hq // hk)
      for i in range(lq):
        pos = q_offset + i
        idx = [j for j in range(lk) if j <= pos and keep(pos, j)]
        out[bi, i, h] = _softmax_attend(q[bi, i, h], k[bi, idx, kh], v[bi, idx, kh], scale)
  return out


def ppa_kept_offset(d: int, p: float, window: int) -> bool:
  """Offset `d >= 0` kept iff `d < window` or `d = ceil(s**(1/p))`, s >= 1."""
  if d < window:
    return True
  if p == 0:
    return False
  if p == 1:
    return True
  s = 1
  while True:
    off = math.ceil(s ** (1.0 / p) - 1e-9)
    if off >= d:
      return off == d
    s += 1


def superlinear_loop(q, k, v, qs, ks, *, sw_index, num_spans, search_power,
                     span_power, backward_factor, forward_factor):
  """Superlinear attention for one query and head at a time (float64).

  Only for configs whose `1/search_power` is an integer (so `f(j) = j**n`
  is exact in integers).
  """
  n = round(1.0 / search_power)
  assert abs(n * search_power - 1.0) < 1e-12, "oracle needs 1/p integral"
  f = lambda j: j ** n  # noqa: E731
  q, k, v, qs, ks = (np.asarray(x, np.float64) for x in (q, k, v, qs, ks))
  b, lq, hq, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5
  window = f(sw_index + 1) - 1
  out = np.zeros((b, lq, hq, d))
  anchors_out = np.full((b, lq, hq, num_spans), -1)
  for bi in range(b):
    for h in range(hq):
      kh = h // (hq // hk)
      for i in range(lq):
        pos = lk - lq + i
        t = pos + 1
        win = list(range(max(pos - window + 1, 0), pos + 1))
        cands = []  # (score, anchor), far to near
        j = sw_index + 1
        while t - f(j) >= 0:
          cands.append((float(np.dot(qs[bi, i, h], ks[bi, t - f(j), kh])), t - f(j)))
          j += 1
        cands.reverse()
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
