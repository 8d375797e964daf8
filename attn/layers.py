"""Flax NNX attention layer over the `attn` ops, with a KV cache.

`Attention(d_model, num_heads, num_kv_heads, kind=..., rngs=...)` projects
`x: [batch, seq, d_model]` to GQA queries, keys and values (optional RoPE),
calls the op of `kind` and projects back. `kind` and its options:

  * `"dense"`: no options.
  * `"sliding"`: `window` (keys seen by a query, itself included).
  * `"ppa"`: `p` in [0, 1], `window` (default 64).
  * `"superlinear"`: `config` (an `attn.SuperlinearConfig`), plus the
    layer's routing: a routing query `q_search` with its own projection,
    scored against `search_key="k"` (the attention keys; the routing query
    is RoPE'd like `q`) or `search_key="accumulated"` (a gated, decaying
    causal scan of the pre-RoPE keys, `gated_linear_scan`, whose memory
    starts near `search_memory` tokens; RoPE on both sides only with
    `search_rope=True`). docs/superlinear.md, "Routing in the model".
    `remat=True`: long Pallas prefills recompute span attention's query
    chunks in the backward (`attn.superlinear_attention`'s `remat`).
  * `"block_sparse"`: `layout`, an `attn.BlockLayout` built for the full
    call's length whose mask is causal (a query never sees a later key).

Every kind is causal. `layer(x)` attends over `x` itself. For
autoregressive decoding, `layer.init_cache(batch, max_len, dtype)` adds
fixed-size cache buffers; then `layer(x, decode=True)` writes `x`'s keys and
values at the cache index, attends over the whole buffer with
`q_offset=index` and advances the index by `x.shape[1]`, so a prefill of `P`
tokens followed by one token at a time gives the outputs of the full call.
Decoding without a cache, or past `max_len`, raises ValueError; under
`jax.jit` the index is traced and cannot be checked, so a call that would
run past `max_len` returns NaN instead of a wrapped-around answer.

Parameters are float32 `nnx.Param`s annotated (`nnx.with_partitioning`)
with the logical axis names `"embed"`, `"q_heads"`, `"kv_heads"`,
`"head_dim"`; outside a mesh they are metadata only.

`attention_fn(kind, ...)` adapts an op to `flax.nnx.MultiHeadAttention`
(no decode, no mask: see its docstring).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attn import ops
from attn.config import SuperlinearConfig
from attn.layout import BlockLayout
from attn.scan import gated_linear_scan

__all__ = ["KINDS", "Attention", "apply_rope", "attend", "attention_fn",
           "gated_linear_scan"]

KINDS = ("dense", "sliding", "ppa", "superlinear", "block_sparse")
SEARCH_KEYS = ("k", "accumulated")

# Options of each kind -> default (_REQUIRED: must be given).
_REQUIRED = object()
_OPTIONS = {
    "dense": {},
    "sliding": {"window": _REQUIRED},
    "ppa": {"p": _REQUIRED, "window": 64},
    "superlinear": {"config": SuperlinearConfig(), "search_key": "k",
                    "search_memory": 32.0, "search_rope": False, "remat": False},
    "block_sparse": {"layout": _REQUIRED},
}


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def kind_options(kind: str, options: dict) -> dict:
  """`options` completed with the defaults of `kind`; ValueError naming a
  bad kind, an unknown or a missing option."""
  if kind not in _OPTIONS:
    raise ValueError(f"kind={kind!r}: must be one of {KINDS}.")
  allowed = _OPTIONS[kind]
  for name in options:
    if name not in allowed:
      raise ValueError(f"{name}= is not an option of kind={kind!r}; its options are "
                       f"{sorted(allowed) or 'none'}.")
  out = {}
  for name, default in allowed.items():
    if name in options:
      out[name] = options[name]
    elif default is _REQUIRED:
      raise ValueError(f"kind={kind!r} needs {name}=.")
    else:
      out[name] = default
  if kind == "superlinear":
    if not isinstance(out["config"], SuperlinearConfig):
      raise ValueError("config= must be an attn.SuperlinearConfig.")
    if out["search_key"] not in SEARCH_KEYS:
      raise ValueError(f"search_key={out['search_key']!r}: must be one of {SEARCH_KEYS}.")
    m = out["search_memory"]
    if (isinstance(m, bool) or not isinstance(m, (int, float))
        or not math.isfinite(m) or m <= 1):
      raise ValueError(f"search_memory={m!r}: must be a finite number > 1 (tokens).")
    for name in ("search_rope", "remat"):
      if not isinstance(out[name], bool):
        raise ValueError(f"{name}={out[name]!r}: must be a bool.")
  if kind == "block_sparse":
    layout = out["layout"]
    if not isinstance(layout, BlockLayout):
      raise ValueError(f"layout= must be an attn.BlockLayout, got {type(layout).__name__}.")
    if layout.band is not None:       # band layouts: causal when the queries start at 0
      causal = layout.q_len == layout.kv_len and layout.band.q_offset == 0
    else:
      causal = layout.q_len == layout.kv_len and not np.triu(layout.to_mask(), 1).any()
    if not causal:
      raise ValueError("layout= must be causal (q_len == kv_len and no query sees a "
                       "later key): the layer is causal attention; call "
                       "attn.block_sparse_attention directly for other masks.")
  return out


# ----------------------------------------------------------------------------
# Pure functions


def apply_rope(x, positions, *, theta: float):
  """Rotary position embedding (rotate-half convention).

  Args:
    x: `[batch, seq, heads, head_dim]` (head_dim even).
    positions: int `[seq]` or `[batch, seq]`, absolute positions.
    theta: base of the frequencies `theta ** (-2i / head_dim)`.

  Returns:
    `[batch, seq, heads, head_dim]` in x.dtype (rotation done in float32).
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * freqs     # [(b,) s, half]
  sin = jnp.sin(angles)[..., None, :]                             # [(b,) s, 1, half]
  cos = jnp.cos(angles)[..., None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _layout_rows(layout: BlockLayout, positions, max_len: int):
  """bool `[n, max_len]`: the keys a causal `layout` shows the queries at
  `positions` (int32 `[n]`, may be traced). Band layouts by arithmetic; a
  table layout's mask rows (a `[L, L]` constant)."""
  cols = jnp.arange(max_len)[None, :]
  if layout.band is not None:
    d = positions[:, None] - cols
    ok = d >= 0
    return ok if layout.band.window is None else ok & (d < layout.band.window)
  rows = jnp.asarray(layout.to_mask()[:, :max_len])
  return jax.lax.dynamic_slice_in_dim(rows, positions[0], positions.shape[0], axis=0)


def _masked_attention(q, k, v, visible, scale):
  """Dense attention under an explicit mask, for block-sparse decoding.

  q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, kv_len, kv_heads,
  head_dim]`; visible: bool `[q_len, kv_len]`. Invisible keys and values
  are zeroed first (a NaN there cannot leak); a row with no visible key
  returns zeros. Returns `[batch, q_len, heads, head_dim]` in q.dtype.
  """
  b, lq, h, d = q.shape
  g = h // k.shape[2]
  seen = visible.any(axis=0)[None, :, None, None]
  k32 = jnp.where(seen, k.astype(jnp.float32), 0.0)
  v32 = jnp.where(seen, v.astype(jnp.float32), 0.0)
  q32 = q.astype(jnp.float32).reshape(b, lq, k.shape[2], g, d)
  s = jnp.einsum("bqkgd,bckd->bkgqc", q32, k32) * scale
  s = jnp.where(visible[None, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkgqc,bckd->bqkgd", p, v32)
  return out.reshape(b, lq, h, d).astype(q.dtype)


def attend(kind: str, options: dict, q, k, v, q_search=None, k_search=None, *,
           q_offset=None, implementation=None, seq_axis=None):
  """The `attn` op of `kind` with its `options` (see `kind_options`).

  q, q_search: `[batch, q_len, num_heads, head_dim]`; k, v, k_search:
  `[batch, kv_len, num_kv_heads, head_dim]` (k_search None = k). For
  `"block_sparse"`, `q_offset` must be None (the layout fixes the lengths).
  `seq_axis`: the mesh axis the sequence is sharded over (context
  parallelism, see the ops), or None. Returns `[batch, q_len, num_heads,
  head_dim]`.
  """
  common = dict(implementation=implementation, seq_axis=seq_axis)
  if kind == "dense":
    return ops.dense_attention(q, k, v, q_offset=q_offset, **common)
  if kind == "sliding":
    return ops.sliding_window_attention(q, k, v, window=options["window"],
                                        q_offset=q_offset, **common)
  if kind == "ppa":
    return ops.ppa_attention(q, k, v, p=options["p"], window=options["window"],
                             q_offset=q_offset, **common)
  if kind == "superlinear":
    return ops.superlinear_attention(q, k, v, q_search, k_search,
                                     config=options["config"], q_offset=q_offset,
                                     remat=options["remat"], **common)
  if kind == "block_sparse":
    if q_offset is not None:
      raise ValueError("kind='block_sparse' takes no q_offset: the layout fixes it.")
    return ops.block_sparse_attention(q, k, v, options["layout"], **common)
  raise ValueError(f"kind={kind!r}: must be one of {KINDS}.")


# ----------------------------------------------------------------------------
# The layer


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...]):
  """A float32 `nnx.Param` of `shape` annotated with logical axis `names`.

  Eager sharding (flax's default) needs a mesh; without one in context the
  names are kept as metadata only.
  """
  value = nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32)
  no_mesh = jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, eager_sharding=False if no_mesh else None)


def _normal(fan_in: int):
  return nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


def _write(buffer, new, index):
  """buffer: [batch, max_len, ...], new: [batch, n, ...] -> buffer with new at index."""
  start = (0, index) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


class Attention(nnx.Module):
  """Causal GQA self-attention over an `attn` op, with optional RoPE and a KV cache.

  Args:
    d_model: width of `x`.
    num_heads, num_kv_heads: query and key/value heads
      (`num_heads % num_kv_heads == 0`).
    kind: one of `KINDS`; `kind_options` are its options (module docstring).
    rngs: initialisation keys (`rngs.params()`).
    head_dim: per-head width (default `d_model // num_heads`; even with RoPE).
    rope_theta: RoPE base, or None for no RoPE.
    implementation: passed to the ops ("reference", "xla", "pallas" or None).

  Parameters: `wq [d_model, num_heads, head_dim]`, `wk`, `wv [d_model,
  num_kv_heads, head_dim]`, `wo [num_heads, head_dim, d_model]`; superlinear
  layers add `wq_search` like `wq`, and with `search_key="accumulated"` the
  decay gate `w_gate [d_model, num_kv_heads]`, `b_gate [num_kv_heads]`.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, kind: str,
               rngs: nnx.Rngs, head_dim: int | None = None,
               rope_theta: float | None = 10_000.0, implementation: str | None = None,
               **options):
    for name, val in (("d_model", d_model), ("num_heads", num_heads),
                      ("num_kv_heads", num_kv_heads)):
      if not _is_int(val) or val < 1:
        raise ValueError(f"{name}={val!r}: must be an int >= 1.")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (GQA).")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not a multiple of num_heads={num_heads}: "
                         "pass head_dim=.")
      head_dim = d_model // num_heads
    if not _is_int(head_dim) or head_dim < 1:
      raise ValueError(f"head_dim={head_dim!r}: must be an int >= 1.")
    if rope_theta is not None:
      if (isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float))
          or not math.isfinite(rope_theta) or rope_theta <= 0):
        raise ValueError(f"rope_theta={rope_theta!r}: must be a finite number > 0 or None.")
      if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even with RoPE (it rotates pairs); "
                         "pass rope_theta=None for no RoPE.")
    if implementation not in (None, "reference", "xla", "pallas"):
      raise ValueError(f"implementation={implementation!r}: must be None, 'reference', "
                       "'xla' or 'pallas'.")
    self.kind = kind
    # Static (hashable) so the options live in the graphdef: `options` is the dict.
    self._options = tuple(sorted(kind_options(kind, options).items()))
    self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
    self.head_dim, self.rope_theta = head_dim, rope_theta
    self.implementation = implementation

    d, h, kv, hd = d_model, num_heads, num_kv_heads, head_dim
    self.wq = _param(rngs, _normal(d), (d, h, hd), ("embed", "q_heads", "head_dim"))
    self.wk = _param(rngs, _normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs, _normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs, _normal(h * hd), (h, hd, d), ("q_heads", "head_dim", "embed"))
    if kind == "superlinear":
      # Search scores are unscaled dot products (as in the reference); a
      # routing query 1/sqrt(head_dim) smaller at init gives scores of unit
      # scale, so the softmax gate over the selected spans starts unsaturated
      # and passes gradient to the search.
      self.wq_search = _param(rngs, _normal(d * hd), (d, h, hd),
                              ("embed", "q_heads", "head_dim"))
    if self.accumulates:
      memory = self.options["search_memory"]
      self.w_gate = _param(rngs, _normal(d), (d, kv), ("embed", "kv_heads"))
      self.b_gate = _param(rngs, nnx.initializers.constant(math.log(memory - 1.0)),
                           (kv,), ("kv_heads",))
    self.cache_index = nnx.data(None)

  @property
  def options(self) -> dict:
    """The kind's options, defaults filled in."""
    return dict(self._options)

  @property
  def accumulates(self) -> bool:
    """Superlinear routing against the accumulated key (carries a scan state)."""
    return self.kind == "superlinear" and self.options["search_key"] == "accumulated"

  def _rope(self, x, positions):
    if self.rope_theta is None:
      return x
    return apply_rope(x, positions, theta=self.rope_theta)

  def _proj(self, x, w):
    """x: [batch, seq, d_model], w: [d_model, heads, head_dim] -> [batch, seq, heads, head_dim]."""
    return jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype))

  def project(self, x, positions, state=None, seq_axis=None):
    """The inputs of the attention op.

    Args:
      x: `[batch, seq, d_model]`; the compute dtype is x.dtype.
      positions: int32 `[seq]`, absolute positions of x.
      state: accumulated-key scan state before x, `[batch, kv_heads,
        head_dim]` float32, or None (zeros).
      seq_axis: the mesh axis x is sharded over along `seq` (the
        accumulated key's scan then runs context parallel), or None.

    Returns:
      `(q, k, v, q_search, k_search, state)`: q `[batch, seq, heads,
      head_dim]` and k, v `[batch, seq, kv_heads, head_dim]` (q, k RoPE'd);
      q_search (superlinear layers, else None), k_search and the new scan
      state `[batch, kv_heads, head_dim]` (accumulated search key without
      seq_axis only, else None).
    """
    q = self._rope(self._proj(x, self.wq), positions)
    k_raw = self._proj(x, self.wk)
    k = self._rope(k_raw, positions)
    v = self._proj(x, self.wv)
    q_search = k_search = None
    if self.kind == "superlinear":
      q_search = self._proj(x, self.wq_search)
      if not self.accumulates or self.options["search_rope"]:
        q_search = self._rope(q_search, positions)
    if self.accumulates:
      gate_logits = (jnp.einsum("bsd,dh->bsh", x.astype(jnp.float32), self.w_gate[...])
                     + self.b_gate[...])
      h = gated_linear_scan(jax.nn.sigmoid(gate_logits), k_raw, state, seq_axis=seq_axis)
      state = h[:, -1] if seq_axis is None else None   # sharded: no carry out
      k_search = h.astype(x.dtype)
      if self.options["search_rope"]:
        k_search = self._rope(k_search, positions)
    else:
      state = None
    return q, k, v, q_search, k_search, state

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """Empty (zero) cache buffers `[batch, max_len, num_kv_heads, head_dim]`
    in `dtype` and a cache index of 0, as `nnx.Cache` variables."""
    for name, val in (("batch", batch), ("max_len", max_len)):
      if not _is_int(val) or val < 1:
        raise ValueError(f"{name}={val!r}: must be an int >= 1.")
    if self.kind == "block_sparse" and max_len > self.options["layout"].kv_len:
      raise ValueError(f"max_len={max_len} exceeds the layout's length "
                       f"{self.options['layout'].kv_len}: build the layout for max_len.")
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    if self.accumulates:
      self.cached_search_key = nnx.Cache(jnp.zeros(shape, dtype))
      self.search_state = nnx.Cache(
          jnp.zeros((batch, self.num_kv_heads, self.head_dim), jnp.float32))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _check_x(self, x):
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got shape {x.shape}.")

  def __call__(self, x, *, decode: bool = False, seq_axis: str | None = None):
    """Causal self-attention, `x: [batch, seq, d_model] -> [batch, seq, d_model]`.

    `decode=False`: over x alone (positions `0 .. seq-1`). `decode=True`:
    x holds the next `seq` tokens after those in the cache (`init_cache`).
    `seq_axis`: a mesh axis x is sharded over along `seq` (context
    parallelism, prefill only; see `attn.ops`).
    """
    x = jnp.asarray(x)
    self._check_x(x)
    if decode:
      if seq_axis is not None:
        raise ValueError("seq_axis= is for prefill: decode=True appends to a local cache; "
                         "pass seq_axis=None.")
      return self._decode(x)
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    q, k, v, q_search, k_search, _ = self.project(x, positions, seq_axis=seq_axis)
    out = attend(self.kind, self.options, q, k, v, q_search, k_search,
                 implementation=self.implementation, seq_axis=seq_axis)
    return self._out(out, x.dtype)

  def _out(self, out, dtype):
    return jnp.einsum("bshk,hkd->bsd", out.astype(dtype), self.wo[...].astype(dtype))

  def _decode(self, x):
    if self.cache_index is None:
      raise ValueError("decode=True needs a cache: call init_cache(batch, max_len, dtype) "
                       "first.")
    batch, max_len = self.cached_key.shape[:2]
    n = x.shape[1]
    if x.shape[0] != batch:
      raise ValueError(f"x has batch {x.shape[0]} but the cache was built for batch "
                       f"{batch}: call init_cache again.")
    index = self.cache_index[...]
    if n > max_len:
      raise ValueError(f"x has {n} tokens, more than the cache's max_len={max_len}.")
    if not isinstance(index, jax.core.Tracer) and int(index) + n > max_len:
      raise ValueError(f"decoding {n} token(s) at cache index {int(index)} runs past "
                       f"max_len={max_len}: call init_cache with a larger max_len.")
    positions = index + jnp.arange(n, dtype=jnp.int32)
    state = self.search_state[...] if self.accumulates else None
    q, k, v, q_search, k_search, state = self.project(x, positions, state)
    keys = _write(self.cached_key[...], k, index)
    values = _write(self.cached_value[...], v, index)
    self.cached_key[...], self.cached_value[...] = keys, values
    if self.accumulates:
      k_search = _write(self.cached_search_key[...], k_search, index)
      self.cached_search_key[...], self.search_state[...] = k_search, state
    if self.kind == "block_sparse":
      visible = _layout_rows(self.options["layout"], positions, max_len)
      visible &= jnp.arange(max_len) < index + n
      out = _masked_attention(q, keys, values, visible, 1.0 / math.sqrt(self.head_dim))
    else:
      out = attend(self.kind, self.options, q, keys.astype(x.dtype), values.astype(x.dtype),
                   q_search, None if k_search is None else k_search.astype(x.dtype),
                   q_offset=index, implementation=self.implementation)
    self.cache_index[...] = index + n
    # Traced past max_len (unchecked above): NaN, never a wrapped-around answer.
    out = jnp.where(index + n <= max_len, out, jnp.nan)
    return self._out(out, x.dtype)


def attention_fn(kind: str = "dense", *, implementation: str | None = None, **options):
  """An `attention_fn` for `flax.nnx.MultiHeadAttention` running an `attn` op.

  The returned function takes `query: [batch, len, heads, head_dim]` and
  `key, value` of the same length (self-attention) and computes the causal
  op of `kind` with `options` (superlinear routes with `query` against
  `key`). It refuses (ValueError) what the ops cannot honour instead of
  answering wrongly: a `mask` or `bias` (MultiHeadAttention's `decode=True`
  passes a cache mask and a one-token query: use `attn.layers.Attention`,
  whose cache passes the right `q_offset`), keys of another length, and
  dropout.
  """
  options = kind_options(kind, options)
  if kind == "superlinear" and options["search_key"] != "k":
    raise ValueError("attention_fn routes superlinear attention with search_key='k' "
                     "only; use attn.layers.Attention for an accumulated search key.")

  def fn(query, key, value, bias=None, mask=None, *, dropout_rate=0.0,
         deterministic=True, dtype=None, module=None, **unused):
    del module, unused
    if mask is not None or bias is not None or query.shape[1] != key.shape[1]:
      raise ValueError(
          "attn.layers.attention_fn computes causal self-attention over the given "
          "tokens and takes no mask or bias. Under MultiHeadAttention(decode=True) "
          "the op cannot know the cache position: use attn.layers.Attention with "
          "init_cache(...) and decode=True instead.")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError("attn.layers.attention_fn has no attention dropout: set "
                       "dropout_rate=0 or deterministic=True.")
    if dtype is not None:
      query, key, value = (a.astype(dtype) for a in (query, key, value))
    q_search = query if kind == "superlinear" else None
    return attend(kind, options, query, key, value, q_search,
                  implementation=implementation)

  return fn
