"""Scans along a long axis that compile in about constant time on TPU.

XLA:TPU compiles `lax.cummax` / `cummin` / `cumsum` along a long axis into
code that grows with its length (`lax.cummax` over 65536 tiles: 3.6 CPU
seconds of a v5e deviceless compile), while a scan along a short minor axis
is cheap. `scan` is an inclusive scan along the last axis computed as scans
within chunks of `_CHUNK` entries plus the scan of the chunk totals
(recursively), combined by the same operator (0.7 CPU seconds at 65536;
`docs/kernels_span.md`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_CHUNK = 1024
_OPS = {"add": (jax.lax.cumsum, jnp.add), "max": (jax.lax.cummax, jnp.maximum),
        "min": (jax.lax.cummin, jnp.minimum)}


def _identity(op: str, dtype):
  if op == "add":
    return jnp.zeros((), dtype)
  info = jnp.iinfo(dtype)
  return jnp.asarray(info.min if op == "max" else info.max, dtype)


def scan(x, op: str = "add", *, reverse: bool = False, chunk: int = _CHUNK):
  """Inclusive scan of int `x: [..., N]` along the last axis.

  `op`: "add" (cumulative sum), "max" or "min"; `reverse`: from the end;
  `chunk`: entries per chunk (scanned along a short minor axis). Same values
  as `jax.lax.cumsum` / `cummax` / `cummin`.
  """
  if op not in _OPS:
    raise ValueError(f"op={op!r}: must be one of {sorted(_OPS)}.")
  if reverse:
    return jnp.flip(scan(jnp.flip(x, -1), op, chunk=chunk), -1)
  cum, combine = _OPS[op]
  n = x.shape[-1]
  if n <= chunk:
    return cum(x, axis=x.ndim - 1)
  m = -(-n // chunk)
  pad = m * chunk - n
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)],
               constant_values=_identity(op, x.dtype))
  xc = xp.reshape(*x.shape[:-1], m, chunk)
  inner = cum(xc, axis=xc.ndim - 1)                      # [..., m, C]
  totals = scan(inner[..., -1], op, chunk=chunk)         # [..., m] inclusive
  carry = jnp.concatenate(
      [jnp.full(totals.shape[:-1] + (1,), _identity(op, x.dtype)), totals[..., :-1]], -1)
  out = combine(inner, carry[..., None]).reshape(*x.shape[:-1], m * chunk)
  return out[..., :n]
