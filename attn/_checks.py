"""Input validation shared by every op: errors name the argument and the fix."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLEMENTATIONS = (None, "reference", "xla", "pallas")


def check_implementation(implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: expected one of "
                     f"{IMPLEMENTATIONS} (None = best available for the backend).")


def check_qkv(q, k, v, *, name_q="q", name_k="k", name_v="v"):
  """Checks `q: [B, Lq, Hq, D]`, `k, v: [B, Lk, Hk, D]`; returns the sizes."""
  for name, x in ((name_q, q), (name_k, k), (name_v, v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape "
          f"{getattr(x, 'shape', type(x))}.")
    if x.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"{name}.dtype={x.dtype}: supported dtypes are float32, "
                       "bfloat16 and float16.")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"dtype mismatch: {name_q}.dtype={q.dtype}, {name_k}.dtype="
                     f"{k.dtype}, {name_v}.dtype={v.dtype}; cast them to one dtype.")
  b, lq, hq, d = q.shape
  bk, lk, hk, dk = k.shape
  if k.shape != v.shape:
    raise ValueError(f"{name_k}.shape={k.shape} and {name_v}.shape={v.shape} must "
                     "be equal.")
  if bk != b:
    raise ValueError(f"batch mismatch: {name_q} has batch {b}, {name_k} has {bk}.")
  if dk != d:
    raise ValueError(f"head_dim mismatch: {name_q} has {d}, {name_k} has {dk}.")
  if min(lq, lk, hq, hk, d) < 1:
    raise ValueError(f"empty input: {name_q}.shape={q.shape}, {name_k}.shape={k.shape}; "
                     "every dimension must be >= 1.")
  if hq % hk:
    raise ValueError(
        f"num_q_heads={hq} (from {name_q}) must be a multiple of num_kv_heads={hk} "
        f"(from {name_k}) for grouped-query attention.")
  if lq > lk:
    raise ValueError(f"q_len={lq} > kv_len={lk}: queries must be the last q_len "
                     "positions of the key sequence (or pass a longer k/v cache).")
  return b, lq, lk, hq, hk, d


def check_search(q, k, q_search, k_search):
  """Checks the routing query/key of superlinear attention against q and k."""
  if getattr(q_search, "ndim", None) != 4:
    raise ValueError(f"q_search must have rank 4 [batch, q_len, num_q_heads, "
                     f"search_dim], got {getattr(q_search, 'shape', type(q_search))}.")
  if k_search is None:
    k_search = k
  if getattr(k_search, "ndim", None) != 4:
    raise ValueError(f"k_search must have rank 4 [batch, kv_len, num_kv_heads, "
                     f"search_dim], got {getattr(k_search, 'shape', type(k_search))}.")
  if q_search.shape[:3] != q.shape[:3]:
    raise ValueError(f"q_search.shape={q_search.shape} must match q.shape={q.shape} "
                     "in [batch, q_len, num_q_heads].")
  if k_search.shape[:3] != k.shape[:3]:
    raise ValueError(f"k_search.shape={k_search.shape} must match k.shape={k.shape} "
                     "in [batch, kv_len, num_kv_heads].")
  if q_search.shape[3] != k_search.shape[3]:
    raise ValueError(f"search_dim mismatch: q_search has {q_search.shape[3]}, "
                     f"k_search has {k_search.shape[3]}.")
  if q_search.dtype != q.dtype or k_search.dtype != q.dtype:
    raise ValueError(f"dtype mismatch: q.dtype={q.dtype}, q_search.dtype="
                     f"{q_search.dtype}, k_search.dtype={k_search.dtype}.")
  return k_search


def is_int(x) -> bool:
  """A Python or numpy integer, not a bool."""
  return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x) -> bool:
  """A Python or numpy real number, not a bool."""
  return isinstance(x, (numbers.Real, np.floating, np.integer)) and not isinstance(
      x, (bool, np.bool_))


def check_q_offset(q_offset, q_len, kv_len):
  """`q_offset`: None, an integer, or a 0-d integer array (traced is fine).

  Concrete values must lie in `[0, kv_len - q_len]`; a traced value cannot be
  checked: out of range, queries past the last key see every key and queries
  before position 0 see none (zero output).
  """
  if q_offset is None:
    return
  if is_int(q_offset):
    value = int(q_offset)
  else:
    dtype = getattr(q_offset, "dtype", None)
    if getattr(q_offset, "ndim", None) != 0 or dtype is None or not jnp.issubdtype(
        dtype, jnp.integer):
      raise ValueError(f"q_offset={q_offset!r}: must be None, an int or a 0-d integer "
                       "array (the absolute position of q[:, 0]).")
    if isinstance(q_offset, jax.core.Tracer):
      return
    value = int(q_offset)
  if not 0 <= value <= kv_len - q_len:
    raise ValueError(f"q_offset={value}: must lie in [0, kv_len - q_len] = "
                     f"[0, {kv_len - q_len}] so every query has its own key.")


def check_scale(scale, head_dim):
  if scale is None:
    return head_dim ** -0.5
  if not is_real(scale) or not scale > 0:
    raise ValueError(f"scale={scale!r}: must be a positive float (default "
                     "1/sqrt(head_dim)).")
  return float(scale)


def check_p(p) -> float:
  if not is_real(p) or not math.isfinite(p):
    raise ValueError(f"p={p!r}: the PPA exponent must be a number in [0, 1].")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p!r} is outside [0, 1]: PPA needs 0 <= p <= 1 "
                     "(p=0 is a sliding window, p=1 full causal attention).")
  return float(p)


def check_window(window, name="window") -> int:
  if not is_int(window) or window <= 0:
    raise ValueError(f"{name}={window!r}: must be a positive int (number of keys "
                     "a query sees, itself included).")
  return int(window)
