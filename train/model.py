"""Decoder-only Flax NNX language model with a configurable attention per layer.

Architecture (pre-norm): token embedding (scaled by `sqrt(d_model)`) ->
`num_layers` x [RMSNorm -> GQA attention with RoPE -> residual, RMSNorm ->
SwiGLU MLP -> residual] -> RMSNorm -> tied or untied output head.

The attention of layer `i` is `config.layer_types[i]`, one of
`"dense" | "sliding" | "ppa" | "superlinear"`, and calls the matching op of
`attn`. Superlinear layers add a routing query `q_search` (own projection)
and score it against either `k` itself (`search_key="k"`, as in the
reference; the routing query is RoPE'd like `q`) or an accumulated key
(`search_key="accumulated"`): a gated, decaying causal scan over the
(pre-RoPE) keys, see `gated_linear_scan`. The accumulated search is
content-addressed by default (no RoPE on either side; `search_rope=True`
applies RoPE to both).

Parameters are float32 and annotated with the logical axis names of
`LOGICAL_AXES` through `nnx.with_partitioning`; `train/sharding.py` maps them
to mesh axes. Outside a mesh the annotations are kept as metadata only (no
eager sharding), so the model can be built on a plain CPU.

Two entry points share every layer:
- `Transformer.__call__(tokens)`: the full causal forward pass.
- `Transformer.forward_with_cache(tokens, cache, offset)`: tokens at absolute
  positions `offset, offset + 1, ...`; writes their keys/values into the
  fixed-size cache buffers and attends over the whole buffer with
  `q_offset=offset` (prefill with `offset=0`, decode with one token).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import attn
from attn.config import SuperlinearConfig

__all__ = [
    "ATTENTION_TYPES", "LOGICAL_AXES", "LayerCache", "ModelConfig", "Transformer",
    "apply_rope", "gated_linear_scan", "init_cache", "rms_norm",
]

ATTENTION_TYPES = ("dense", "sliding", "ppa", "superlinear")
SEARCH_KEYS = ("k", "accumulated")
DTYPES = ("float32", "bfloat16")
IMPLEMENTATIONS = attn.IMPLEMENTATION_CHOICES

# The only logical axis names parameters are annotated with.
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static, hashable hyper-parameters of `Transformer`.

  Attributes:
    vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim,
      mlp_dim: sizes (positive ints; `num_heads % num_kv_heads == 0`, even
      `head_dim` for RoPE).
    tie_embeddings: output head is the transposed token embedding.
    rope_theta: RoPE base.
    dtype: compute dtype, "float32" or "bfloat16" (params stay float32,
      logits are float32).
    attention: attention type of every layer unless `layer_pattern` is set.
    layer_pattern: optional tuple of attention types repeated cyclically over
      the layers, e.g. ("sliding", "sliding", "sliding", "superlinear"). A
      comma separated string is accepted and turned into a tuple.
    window: window (keys, the query included) of "sliding" and "ppa" layers.
    ppa_p: PPA exponent in [0, 1].
    superlinear: configuration of "superlinear" layers.
    search_key: "k" (search against the attention keys) or "accumulated"
      (against a gated causal scan of the keys).
    search_memory: initial memory of that scan in tokens (> 1): the decay
      gate starts near `1 - 1 / search_memory` (its bias is initialised to
      `log(search_memory - 1)`), so that an anchor's search key starts out
      summarising about the backward part of its span rather than only its
      own token. Acts only with `search_key="accumulated"`.
    search_rope: with `search_key="accumulated"`, apply RoPE to the routing
      query and the accumulated key (relative-position-aware search scores).
      Off by default: the search is then content-addressed (the stripe
      layout already fixes where anchors sit), which is what let the
      superlinear layer learn to route in docs/niah_routing.md; with RoPE it
      learned a fixed positional preference instead. `search_key="k"`
      always searches with RoPE (the keys are the attention's).
    attn_implementation: passed to the attn ops (None = best available).
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  dtype: str = "float32"
  attention: str = "dense"
  layer_pattern: tuple[str, ...] | None = None
  window: int = 64
  ppa_p: float = 0.5
  superlinear: SuperlinearConfig = SuperlinearConfig()
  search_key: str = "k"
  search_memory: float = 32.0
  search_rope: bool = False
  attn_implementation: str | None = None
  norm_eps: float = 1e-6

  def __post_init__(self):
    def bad(name, need):
      raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {need}.")

    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim", "window"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        bad(name, "must be an int >= 1")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"must divide num_heads={self.num_heads} (GQA)")
    if self.head_dim % 2:
      bad("head_dim", "must be even (RoPE rotates pairs)")
    if not isinstance(self.tie_embeddings, bool):
      bad("tie_embeddings", "must be a bool")
    for name in ("rope_theta", "norm_eps"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value) or value <= 0):
        bad(name, "must be a finite number > 0")
    if self.dtype not in DTYPES:
      bad("dtype", f"must be one of {DTYPES}")
    if self.attention not in ATTENTION_TYPES:
      bad("attention", f"must be one of {ATTENTION_TYPES}")
    pattern = self.layer_pattern
    if isinstance(pattern, str):
      pattern = tuple(s.strip() for s in pattern.split(",") if s.strip())
    elif isinstance(pattern, list):
      pattern = tuple(pattern)
    if pattern is not None:
      if (not isinstance(pattern, tuple) or not pattern
          or any(p not in ATTENTION_TYPES for p in pattern)):
        bad("layer_pattern",
            f"must be None or a non-empty tuple of {ATTENTION_TYPES}")
      object.__setattr__(self, "layer_pattern", pattern)
    p = self.ppa_p
    if (isinstance(p, bool) or not isinstance(p, (int, float))
        or not math.isfinite(p) or not 0.0 <= p <= 1.0):
      bad("ppa_p", "must be a number in [0, 1]")
    if not isinstance(self.superlinear, SuperlinearConfig):
      bad("superlinear", "must be an attn.SuperlinearConfig")
    if self.search_key not in SEARCH_KEYS:
      bad("search_key", f"must be one of {SEARCH_KEYS}")
    if not isinstance(self.search_rope, bool):
      bad("search_rope", "must be a bool")
    m = self.search_memory
    if (isinstance(m, bool) or not isinstance(m, (int, float))
        or not math.isfinite(m) or m <= 1):
      bad("search_memory", "must be a finite number > 1 (tokens)")
    if self.attn_implementation not in IMPLEMENTATIONS:
      bad("attn_implementation", f"must be one of {IMPLEMENTATIONS}")

  @property
  def layer_types(self) -> tuple[str, ...]:
    """Attention type of each layer: `[num_layers]`."""
    if self.layer_pattern is None:
      return (self.attention,) * self.num_layers
    n = len(self.layer_pattern)
    return tuple(self.layer_pattern[i % n] for i in range(self.num_layers))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# ----------------------------------------------------------------------------
# Parameters


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...],
           names: tuple[str, ...]) -> nnx.Param:
  """A float32 `nnx.Param` of `shape` annotated with logical axis `names`.

  Eager sharding (flax's default) needs a mesh; without one in context the
  names are kept as metadata only.
  """
  assert len(names) == len(shape) and all(n in LOGICAL_AXES for n in names)
  value = nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.float32)
  no_mesh = jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, eager_sharding=False if no_mesh else None)


def _normal(fan_in: int):
  return nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


# ----------------------------------------------------------------------------
# Pure functions


def rms_norm(x, scale, *, eps: float):
  """x: [..., dim], scale: [dim] -> [..., dim] in x.dtype (computed in float32)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


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


def gated_linear_scan(gates, values, initial=None):
  """Causal gated, decaying average: `h_t = a_t * h_{t-1} + (1 - a_t) * x_t`.

  Computed with `jax.lax.associative_scan` over the sequence axis on the
  affine maps `h -> a h + b` (composition `(a1, b1) then (a2, b2)` =
  `(a1 a2, a2 b1 + b2)`), in float32.

  Args:
    gates: `a`, `[batch, seq, heads]`, values in [0, 1].
    values: `x`, `[batch, seq, heads, dim]`.
    initial: `h_{-1}`, `[batch, heads, dim]`, or None for zeros.

  Returns:
    `h`: `[batch, seq, heads, dim]` float32 (`h[:, -1]` is the state to carry).
  """
  a = gates.astype(jnp.float32)[..., None]                        # [b, s, h, 1]
  b = (1.0 - a) * values.astype(jnp.float32)                      # [b, s, h, d]
  if initial is not None:
    b = b.at[:, 0].add(a[:, 0] * initial.astype(jnp.float32))

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
  return h


def attend(kind: str, config: ModelConfig, q, k, v, q_search=None, k_search=None,
           q_offset=None):
  """Dispatch to the `attn` op of layer type `kind`.

  q, q_search: `[batch, q_len, num_heads, head_dim]`; k, v, k_search:
  `[batch, kv_len, num_kv_heads, head_dim]` (k_search None = k).
  Returns `[batch, q_len, num_heads, head_dim]`.
  """
  impl = config.attn_implementation
  if kind == "dense":
    return attn.dense_attention(q, k, v, q_offset=q_offset, implementation=impl)
  if kind == "sliding":
    return attn.sliding_window_attention(q, k, v, window=config.window,
                                         q_offset=q_offset, implementation=impl)
  if kind == "ppa":
    return attn.ppa_attention(q, k, v, p=config.ppa_p, window=config.window,
                              q_offset=q_offset, implementation=impl)
  if kind == "superlinear":
    return attn.superlinear_attention(q, k, v, q_search, k_search,
                                      config=config.superlinear,
                                      q_offset=q_offset, implementation=impl)
  raise ValueError(f"unknown attention type {kind!r}")


# ----------------------------------------------------------------------------
# KV cache


class LayerCache(NamedTuple):
  """Decode state of one layer (a pytree; None fields are absent).

  k, v: `[batch, max_len, num_kv_heads, head_dim]` in the compute dtype, the
    RoPE'd keys and the values of positions `< offset` (zeros beyond).
  k_search: like k, the RoPE'd accumulated keys (superlinear layers with
    `search_key="accumulated"` only).
  state: `[batch, num_kv_heads, head_dim]` float32, the scan state `h` of the
    last written position (same layers only).
  """
  k: jax.Array
  v: jax.Array
  k_search: jax.Array | None = None
  state: jax.Array | None = None


def _accumulates(config: ModelConfig, kind: str) -> bool:
  return kind == "superlinear" and config.search_key == "accumulated"


def _search_rope(config: ModelConfig) -> bool:
  """RoPE on the routing query: always against the RoPE'd attention keys
  (`search_key="k"`), optional against the accumulated key."""
  return config.search_key == "k" or config.search_rope


def init_cache(config: ModelConfig, batch: int, max_len: int) -> tuple[LayerCache, ...]:
  """Empty cache: one `LayerCache` per layer with `[batch, max_len, ...]` buffers."""
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dt = config.compute_dtype
  caches = []
  for kind in config.layer_types:
    extra = {}
    if _accumulates(config, kind):
      extra = dict(k_search=jnp.zeros(shape, dt),
                   state=jnp.zeros((batch, config.num_kv_heads, config.head_dim),
                                   jnp.float32))
    caches.append(LayerCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), **extra))
  return tuple(caches)


def _write(buffer, new, offset):
  """buffer: [batch, max_len, ...], new: [batch, n, ...] -> buffer with new at offset."""
  start = (0, offset) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


# ----------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
  """x: [..., dim] -> [..., dim]; learned scale annotated ("norm",)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",))

  def __call__(self, x):
    return rms_norm(x, self.scale[...], eps=self.eps)


class Attention(nnx.Module):
  """GQA self-attention with RoPE; the op is chosen by `kind`."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    c = config
    self.config, self.kind = c, kind
    d, h, kv, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    self.wq = _param(rngs, _normal(d), (d, h, hd), ("embed", "q_heads", "head_dim"))
    self.wk = _param(rngs, _normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs, _normal(d), (d, kv, hd), ("embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs, _normal(h * hd), (h, hd, d),
                     ("q_heads", "head_dim", "embed"))
    if kind == "superlinear":
      # Search scores are unscaled dot products (as in the reference); a
      # routing query 1/sqrt(head_dim) smaller at init gives scores of unit
      # scale, so the softmax gate over the selected spans starts unsaturated
      # and passes gradient to the search.
      self.wq_search = _param(rngs, _normal(d * hd), (d, h, hd),
                              ("embed", "q_heads", "head_dim"))
    if _accumulates(c, kind):
      self.w_gate = _param(rngs, _normal(d), (d, kv), ("embed", "kv_heads"))
      self.b_gate = _param(rngs, nnx.initializers.constant(math.log(c.search_memory - 1.0)),
                           (kv,), ("kv_heads",))

  def _proj(self, x, w):
    """x: [batch, seq, d_model], w: [d_model, heads, head_dim] -> [batch, seq, heads, head_dim]."""
    return jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype))

  def project(self, x, positions, state=None):
    """The inputs of the attention op.

    Args:
      x: `[batch, seq, d_model]` (normed), compute dtype.
      positions: int32 `[seq]`, absolute positions of x.
      state: the accumulated-key scan state before x (`LayerCache.state`),
        or None (zeros).

    Returns:
      `(q, k, v, q_search, k_search, state)`: q `[batch, seq, heads,
      head_dim]` and k, v `[batch, seq, kv_heads, head_dim]` (q, k RoPE'd);
      q_search (superlinear layers, else None), k_search and the new scan
      state `[batch, kv_heads, head_dim]` (accumulated search key only, else
      None).
    """
    c = self.config
    theta = c.rope_theta
    q = apply_rope(self._proj(x, self.wq), positions, theta=theta)
    k_raw = self._proj(x, self.wk)
    k = apply_rope(k_raw, positions, theta=theta)
    v = self._proj(x, self.wv)

    q_search = k_search = None
    if self.kind == "superlinear":
      q_search = self._proj(x, self.wq_search)
      if _search_rope(c):
        q_search = apply_rope(q_search, positions, theta=theta)
    if _accumulates(c, self.kind):
      gate_logits = (jnp.einsum("bsd,dh->bsh", x.astype(jnp.float32), self.w_gate[...])
                     + self.b_gate[...])
      h = gated_linear_scan(jax.nn.sigmoid(gate_logits), k_raw, state)
      state = h[:, -1]
      k_search = h.astype(x.dtype)
      if c.search_rope:
        k_search = apply_rope(k_search, positions, theta=theta)
    else:
      state = None
    return q, k, v, q_search, k_search, state

  def __call__(self, x, positions, cache: LayerCache | None = None, offset=None):
    """Causal self-attention.

    Args:
      x: `[batch, seq, d_model]` (normed), compute dtype.
      positions: int32 `[seq]`, absolute positions of x.
      cache: None (full forward; keys are x's own) or this layer's cache,
        whose buffers get x's keys/values written at `offset`.
      offset: int32 scalar (may be traced), absolute position of x[:, 0];
        required with a cache.

    Returns:
      `(out [batch, seq, d_model], new cache or None)`.
    """
    c = self.config
    q, k, v, q_search, k_search, state = self.project(
        x, positions, None if cache is None else cache.state)
    if cache is not None:
      k_all, v_all = _write(cache.k, k, offset), _write(cache.v, v, offset)
      ks_all = None if k_search is None else _write(cache.k_search, k_search, offset)
      cache = LayerCache(k_all, v_all, ks_all, state)
      out = attend(self.kind, c, q, k_all, v_all, q_search, ks_all, q_offset=offset)
    else:
      out = attend(self.kind, c, q, k, v, q_search, k_search)
    out = jnp.einsum("bshk,hkd->bsd", out.astype(x.dtype), self.wo[...].astype(x.dtype))
    return out, cache


class MLP(nnx.Module):
  """SwiGLU: `down(silu(x @ gate) * (x @ up))`, x: [batch, seq, d_model]."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d, m = config.d_model, config.mlp_dim
    self.w_gate = _param(rngs, _normal(d), (d, m), ("embed", "mlp"))
    self.w_up = _param(rngs, _normal(d), (d, m), ("embed", "mlp"))
    self.w_down = _param(rngs, _normal(m), (m, d), ("mlp", "embed"))

  def __call__(self, x):
    dt = x.dtype
    g = x @ self.w_gate[...].astype(dt)
    u = x @ self.w_up[...].astype(dt)
    return (jax.nn.silu(g) * u) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.attention = Attention(config, kind, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, cache=None, offset=None):
    """x: [batch, seq, d_model] -> ([batch, seq, d_model], cache)."""
    h, cache = self.attention(self.attn_norm(x), positions, cache, offset)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """Decoder-only language model; `model(tokens) -> logits`."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    self.config = config
    d, vocab = config.d_model, config.vocab_size
    self.embedding = _param(rngs, _normal(d), (vocab, d), ("vocab", "embed"))
    self.blocks = nnx.List([Block(config, kind, rngs=rngs)
                            for kind in config.layer_types])
    self.final_norm = RMSNorm(d, eps=config.norm_eps, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _param(rngs, _normal(d), (d, vocab), ("embed", "vocab"))

  def _embed(self, tokens):
    """tokens: int32 [batch, seq] -> [batch, seq, d_model] compute dtype."""
    c = self.config
    x = jnp.take(self.embedding[...], tokens, axis=0) * math.sqrt(c.d_model)
    return x.astype(c.compute_dtype)

  def _logits(self, x):
    """x: [batch, seq, d_model] -> float32 [batch, seq, vocab]."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      w = self.embedding[...].astype(x.dtype)
      return jnp.einsum("bsd,vd->bsv", x, w, preferred_element_type=jnp.float32)
    w = self.lm_head[...].astype(x.dtype)
    return jnp.einsum("bsd,dv->bsv", x, w, preferred_element_type=jnp.float32)

  def __call__(self, tokens):
    """tokens: int32 `[batch, seq]` -> float32 logits `[batch, seq, vocab]`."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    x = self._embed(tokens)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    for block in self.blocks:
      x, _ = block(x, positions)
    return self._logits(x)

  def forward_with_cache(self, tokens, cache: tuple[LayerCache, ...], offset):
    """Run `tokens` at absolute positions `offset + [0, seq)` against the cache.

    Args:
      tokens: int32 `[batch, seq]`.
      cache: from `init_cache(config, batch, max_len)`, holding positions
        `< offset`; `offset + seq <= max_len`.
      offset: int32 scalar (may be traced).

    Returns:
      `(logits float32 [batch, seq, vocab], updated cache)`.
    """
    tokens = jnp.asarray(tokens)
    offset = jnp.asarray(offset, jnp.int32)
    x = self._embed(tokens)
    positions = offset + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block(x, positions, layer_cache, offset)
      new_cache.append(layer_cache)
    return self._logits(x), tuple(new_cache)
