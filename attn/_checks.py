"""Input validation shared by every op: errors name the argument and the fix."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLEMENTATION_CHOICES = (None, "reference", "xla", "pallas")


def check_implementation(implementation):
  if implementation not in IMPLEMENTATION_CHOICES:
    raise ValueError(f"implementation={implementation!r}: expected one of "
                     f"{IMPLEMENTATION_CHOICES} (None = best available for the backend).")


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
    raise ValueError(f"batch mismatch: {name_q} has batch {b}, {name_k} has {bk}; "
                     "pass the same batch to both (broadcast one of them first).")
  if dk != d:
    raise ValueError(f"head_dim mismatch: {name_q} has {d}, {name_k} has {dk}; project "
                     f"queries and keys to the same head_dim (for a separate routing "
                     f"dimension use q_search/k_search).")
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


def _concrete_scalar(x):
  """`x` as a numpy scalar if it is a concrete 0-d number (Python, numpy or a
  concrete jax array), else None. A traced value is not concrete."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, (bool, np.bool_)):
    return None
  if isinstance(x, (numbers.Number, np.generic)):
    return x
  if getattr(x, "ndim", None) == 0 and hasattr(x, "dtype"):
    try:
      return np.asarray(x)[()]
    except Exception:  # noqa: BLE001  (e.g. a tracer hidden in a wrapper)
      return None
  return None


def is_int(x) -> bool:
  """A concrete integer scalar (Python, numpy, or a 0-d jax array), not a bool."""
  v = _concrete_scalar(x)
  return v is not None and isinstance(v, (numbers.Integral, np.integer)) and not isinstance(
      v, (bool, np.bool_))


def is_real(x) -> bool:
  """A concrete real scalar (Python, numpy, or a 0-d jax array), not a bool."""
  v = _concrete_scalar(x)
  return v is not None and isinstance(v, (numbers.Real, np.floating, np.integer)) and \
      not isinstance(v, (bool, np.bool_))


def traced_hint(x) -> str:
  """Extra words for an error when `x` is a traced value."""
  return (" It is a static argument: pass a concrete number, not a value traced "
          "under jax.jit/grad/vmap." if isinstance(x, jax.core.Tracer) else "")


def check_seq_len(n, name="seq_len") -> int:
  if not is_int(n) or int(n) < 0:
    raise ValueError(f"{name}={n!r}: must be an int >= 0.{traced_hint(n)}")
  return int(n)


def check_q_offset(q_offset, q_len, kv_len):
  """`q_offset`: None, an integer, or a 0-d integer array (traced is fine).

  Concrete values must lie in `[0, kv_len - q_len]`. A traced value cannot be
  checked; every implementation then gives the same result for any offset:
  query `i` sits at position `q_offset + i`, and a query whose position lies
  outside `[0, kv_len)` (before the first key or past the last one) has no
  key of its own and returns a zero row (and no gradient).
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
  """`scale`: None (= `1/sqrt(head_dim)`) or a finite positive concrete number."""
  if scale is None:
    return head_dim ** -0.5
  if not is_real(scale) or not math.isfinite(float(scale)) or not float(scale) > 0:
    raise ValueError(f"scale={scale!r}: must be a finite positive number (default "
                     f"1/sqrt(head_dim)).{traced_hint(scale)}")
  return float(scale)


def check_p(p, name="p") -> float:
  """The PPA exponent: a concrete number in `[0, 1]`."""
  if not is_real(p) or not math.isfinite(float(p)):
    raise ValueError(f"{name}={p!r}: the PPA exponent must be a number in [0, 1]."
                     f"{traced_hint(p)}")
  p = float(p)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name}={p!r} is outside [0, 1]: PPA needs 0 <= p <= 1 "
                     "(p=0 is a sliding window, p=1 full causal attention).")
  return p


def check_window(window, name="window") -> int:
  if not is_int(window) or int(window) <= 0:
    raise ValueError(f"{name}={window!r}: must be a positive int (number of keys "
                     f"a query sees, itself included).{traced_hint(window)}")
  return int(window)
