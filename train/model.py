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

The attention of every layer is the library layer `attn.layers.Attention`
(same parameter names as before it moved there: `wq`, `wk`, `wv`, `wo`,
`wq_search`, `w_gate`, `b_gate`), so the model and a user of the library run
one implementation. `Transformer.__call__(tokens)` is the full causal
forward pass; after `Transformer.init_cache(batch, max_len)`,
`Transformer.__call__(tokens, decode=True)` runs tokens that follow those in
the layers' KV caches (prefill, then one token at a time).

Context parallelism: `Transformer.__call__(tokens, activations=spec)` with a
`PartitionSpec` `(batch axes, seq axis, None)`, under the mesh (e.g.
`jax.sharding.use_abstract_mesh`) inside `jax.jit`, constrains the hidden
states `[batch, seq, d_model]` to that sharding between layers (norms, MLPs
and projections are per token, so they run on each shard's tokens) and runs
every layer's attention op on its local blocks inside a `jax.shard_map` with
`seq_axis=<seq axis>`: queries stay sharded and the op gathers the keys it
needs over that axis (`attn.context_parallel`). The layer's projections and
output projection are those of `attn.layers.Attention`; only the op call
differs (`context_parallel_attention`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import attn
from attn import layers
from attn.config import SuperlinearConfig
from attn.layers import apply_rope, gated_linear_scan

__all__ = [
    "ATTENTION_TYPES", "LOGICAL_AXES", "ModelConfig", "Transformer",
    "apply_rope", "attend", "gated_linear_scan", "layer_options", "rms_norm",
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
    superlinear_remat: superlinear layers call the op with `remat=True`:
      with the Pallas kernels, prefills of more than 128K tokens recompute
      span attention's query chunks in the backward (less memory, a second
      span forward; `attn.superlinear_attention`). Same values and
      gradients.
    attn_implementation: passed to the attn ops (None = best available).
    allow_interpret: let training run `attn_implementation="pallas"` on a
      backend without compiled Pallas kernels (CPU), where the kernels run in
      Pallas interpret mode: slow, meant for tests. Training refuses that
      combination otherwise (`train.preflight`).
    norm_eps: RMSNorm epsilon.
    remat: recompute each block's activations in the backward pass
      (`nnx.remat` per block): only the blocks' inputs `[batch, seq,
      d_model]` are kept between the forward and the backward pass, at the
      cost of a second forward pass. Same values and gradients.
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
  superlinear_remat: bool = False
  attn_implementation: str | None = None
  allow_interpret: bool = False
  norm_eps: float = 1e-6
  remat: bool = False

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
    if not isinstance(self.superlinear_remat, bool):
      bad("superlinear_remat", "must be a bool")
    m = self.search_memory
    if (isinstance(m, bool) or not isinstance(m, (int, float))
        or not math.isfinite(m) or m <= 1):
      bad("search_memory", "must be a finite number > 1 (tokens)")
    if self.attn_implementation not in IMPLEMENTATIONS:
      bad("attn_implementation", f"must be one of {IMPLEMENTATIONS}")
    if not isinstance(self.allow_interpret, bool):
      bad("allow_interpret", "must be a bool")
    if not isinstance(self.remat, bool):
      bad("remat", "must be a bool")

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


def layer_options(config: ModelConfig, kind: str) -> dict:
  """The `attn.layers.Attention` options of a layer of type `kind`."""
  if kind == "sliding":
    return dict(window=config.window)
  if kind == "ppa":
    return dict(p=config.ppa_p, window=config.window)
  if kind == "superlinear":
    return dict(config=config.superlinear, search_key=config.search_key,
                search_memory=config.search_memory, search_rope=config.search_rope,
                remat=config.superlinear_remat)
  if kind == "dense":
    return {}
  raise ValueError(f"unknown attention type {kind!r}")


def attend(kind: str, config: ModelConfig, q, k, v, q_search=None, k_search=None,
           q_offset=None, seq_axis: str | None = None):
  """The `attn` op of layer type `kind` (`attn.layers.attend` with the
  config's options and implementation).

  q, q_search: `[batch, q_len, num_heads, head_dim]`; k, v, k_search:
  `[batch, kv_len, num_kv_heads, head_dim]` (k_search None = k).
  `seq_axis`: the mesh axis their sequence dimension is sharded over
  (context parallelism; the op's `seq_axis=`), or None.
  Returns `[batch, q_len, num_heads, head_dim]`.
  """
  options = layers.kind_options(kind, layer_options(config, kind))
  return layers.attend(kind, options, q, k, v, q_search, k_search, q_offset=q_offset,
                       implementation=config.attn_implementation, seq_axis=seq_axis)


def _constrain(x, activations: P | None):
  """x: `[batch, seq, ...]` constrained to `activations` (None: as is)."""
  if activations is None:
    return x
  return jax.lax.with_sharding_constraint(x, P(*activations[:2], *([None] * (x.ndim - 2))))


def _seq_axis(activations: P | None) -> str | None:
  """The sequence entry of an activation spec: one mesh axis name or None."""
  if activations is None or len(activations) < 2 or activations[1] is None:
    return None
  axis = activations[1]
  if not isinstance(axis, str):
    raise ValueError(f"activations={activations}: the sequence entry must be one mesh "
                     "axis name (it is the attention ops' seq_axis) or None")
  return axis


# ----------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
  """x: [..., dim] -> [..., dim]; learned scale annotated ("norm",)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("norm",))

  def __call__(self, x):
    return rms_norm(x, self.scale[...], eps=self.eps)


def Attention(config: ModelConfig, kind: str, *, rngs: nnx.Rngs) -> layers.Attention:
  """The library layer `attn.layers.Attention` of layer type `kind`."""
  return layers.Attention(config.d_model, config.num_heads, config.num_kv_heads,
                          kind=kind, rngs=rngs, head_dim=config.head_dim,
                          rope_theta=config.rope_theta,
                          implementation=config.attn_implementation,
                          **layer_options(config, kind))


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


def _head_axis(mesh, num_heads: int, num_kv_heads: int) -> str | None:
  """"tensor" when it divides both head counts (each shard keeps whole GQA
  groups), else None (the heads stay whole on every tensor shard)."""
  n = mesh.shape.get("tensor", 1)
  return "tensor" if n > 1 and num_heads % n == 0 and num_kv_heads % n == 0 else None


def context_parallel_attention(layer: layers.Attention, config: ModelConfig, x,
                               activations: P):
  """`layer(x)` with the op run context-parallel over the sequence axis of
  `activations`.

  x: `[batch, seq, d_model]` sharded as `activations` (global shape, inside
  `jax.jit` under the mesh). The projections and the output projection are
  the layer's own, per token; positions are global. The op runs inside a
  `jax.shard_map` over every mesh axis (batch over the batch axes, sequence
  over the seq axis, heads over "tensor" when it divides them), where it
  takes its local blocks and gathers the keys it needs over the seq axis
  itself (`attn.context_parallel`); the accumulated search key's scan runs
  sequence-sharded (`attn.scan`). Fully manual because the op's own
  shard_map over the seq axis alone, under an Auto mesh with further axes,
  fails to compile its bf16 gradient on XLA CPU (docs/training.md).
  Returns `[batch, seq, d_model]` in x.dtype.
  """
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)
  seq_axis, kind = activations[1], layer.kind
  # The accumulated search key's scan runs sequence-sharded (attn.scan).
  q, k, v, q_search, k_search, _ = layer.project(x, positions, seq_axis=seq_axis)
  mesh = jax.sharding.get_abstract_mesh()
  heads = _head_axis(mesh, q.shape[2], k.shape[2])
  spec = P(activations[0], activations[1], heads, None)
  has_search, has_k_search = q_search is not None, k_search is not None
  arrays = [a for a in (q, k, v, q_search, k_search) if a is not None]

  def local(*a):
    qs = a[3] if has_search else None
    ks = a[4] if has_k_search else None
    return attend(kind, config, a[0], a[1], a[2], qs, ks, seq_axis=seq_axis)

  out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec,
                      check_vma=False)(*arrays)
  return jnp.einsum("bshk,hkd->bsd", out.astype(x.dtype), layer.wo[...].astype(x.dtype))


class Block(nnx.Module):
  """Pre-norm residual block: attention then SwiGLU MLP."""

  def __init__(self, config: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.config = config
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.attention = Attention(config, kind, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, *, decode: bool = False, activations: P | None = None):
    """x: [batch, seq, d_model] -> [batch, seq, d_model]; `activations`: see
    `Transformer.__call__`."""
    h = self.attn_norm(x)
    seq_axis = _seq_axis(activations)
    if seq_axis is not None and not decode:
      x = x + context_parallel_attention(self.attention, self.config, h, activations)
    else:
      x = x + self.attention(h, decode=decode)
    x = _constrain(x, activations)
    return _constrain(x + self.mlp(self.mlp_norm(x)), activations)


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

  def __call__(self, tokens, *, decode: bool = False, activations: P | None = None):
    """tokens: int32 `[batch, seq]` -> float32 logits `[batch, seq, vocab]`.

    `decode=True` (after `init_cache`): the tokens follow those already in
    the layers' caches (their positions start at the cache index), which
    they are appended to; prefill with the prompt, then one token at a time.

    `activations`: None, or the `PartitionSpec` `(batch axes, seq axis,
    None)` of the hidden states (`train.sharding.activation_spec`; needs
    `jax.set_mesh`): they are constrained to it after every layer, the
    logits keep it, and a non-None seq axis runs every attention op
    context-parallel over it (not with `decode=True`).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    x = _constrain(self._embed(tokens), activations)

    def run(block, x):
      return block(x, decode=decode, activations=activations)

    if self.config.remat and not decode:
      run = nnx.remat(run)
    for block in self.blocks:
      x = run(block, x)
    return _constrain(self._logits(x), activations)

  def init_cache(self, batch: int, max_len: int):
    """Empty KV caches (`attn.layers.Attention.init_cache`) of `max_len`
    positions in the compute dtype in every layer; index 0."""
    for block in self.blocks:
      block.attention.init_cache(batch, max_len, self.config.compute_dtype)
