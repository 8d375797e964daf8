"""Tests of attn.layers: the NNX attention layer, its KV cache and the
MultiHeadAttention adapter."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attn
from attn import layers

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8
LEN, PREFILL, MAX_LEN = 12, 5, 16


def _sparse_causal_mask(n):
  """Causal, and sparse: a local band of 3 plus every 4th key."""
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  return (j <= i) & ((i - j < 3) | (j % 4 == 0))


KIND_OPTIONS = {
    "dense": {},
    "sliding": dict(window=4),
    "ppa": dict(p=0.5, window=3),
    "superlinear": dict(config=attn.SuperlinearConfig(sw_index=1)),
    "superlinear_acc": dict(config=attn.SuperlinearConfig(sw_index=1),
                            search_key="accumulated", search_memory=4.0),
    "block_sparse": dict(layout=attn.BlockLayout.from_mask(
        _sparse_causal_mask(LEN), block_q=4, block_k=4)),
    "block_sparse_band": dict(layout=attn.BlockLayout.sliding_window(
        LEN, window=5, block_q=4, block_k=4)),
}


def make_layer(name, seed=0, **kw):
  kind = name.removesuffix("_acc").removesuffix("_band")
  layer = layers.Attention(D_MODEL, HEADS, KV_HEADS, kind=kind, rngs=nnx.Rngs(seed),
                           **KIND_OPTIONS[name], **kw)
  # Peaked attention: a wrong position or a stale cache entry shows.
  for pname in ("wq", "wk", "wq_search"):
    if hasattr(layer, pname):
      p = getattr(layer, pname)
      p[...] = p[...] * 4.0
  return layer


def inputs(dtype, batch=2, length=LEN, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL)).astype(dtype)


def fill_nan(layer):
  """NaN in every cache buffer slot (written slots get overwritten)."""
  for name in ("cached_key", "cached_value", "cached_search_key"):
    if hasattr(layer, name):
      var = getattr(layer, name)
      var[...] = jnp.full(var.shape, jnp.nan, var.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(KIND_OPTIONS))
def test_prefill_then_one_token_at_a_time_equals_full_call(name, dtype):
  layer = make_layer(name)
  x = inputs(dtype)
  full = layer(x)
  chex.assert_shape(full, x.shape)
  chex.assert_type(full, dtype)
  max_len = LEN if name.startswith("block_sparse") else MAX_LEN   # the layout's length
  layer.init_cache(2, max_len, dtype)
  fill_nan(layer)
  outs = [layer(x[:, :PREFILL], decode=True)]
  outs += [layer(x[:, i:i + 1], decode=True) for i in range(PREFILL, LEN)]
  got = jnp.concatenate(outs, axis=1)
  assert int(layer.cache_index[...]) == LEN
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  chex.assert_trees_all_close(got.astype(jnp.float32), full.astype(jnp.float32),
                              atol=tol, rtol=tol)


def _rope_oracle(x, pos, theta):
  """x: [seq, heads, d] numpy, rotate-half pairs (i, i + d/2) by pos * theta^(-2i/d)."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for s in range(x.shape[0]):
    for i in range(d // 2):
      a = pos[s] * theta ** (-2.0 * i / d)
      c, sn = np.cos(a), np.sin(a)
      out[s, :, i] = x[s, :, i] * c - x[s, :, i + d // 2] * sn
      out[s, :, i + d // 2] = x[s, :, i + d // 2] * c + x[s, :, i] * sn
  return out


@pytest.mark.parametrize("rope_theta", [10_000.0, None])
def test_dense_layer_matches_numpy_oracle(rope_theta):
  """Projections, RoPE, causal GQA softmax and output projection by hand."""
  layer = make_layer("dense", rope_theta=rope_theta)
  x = np.asarray(inputs(jnp.float32, batch=1))[0]                 # [L, d_model]
  wq, wk, wv, wo = (np.asarray(getattr(layer, n)[...], np.float64)
                    for n in ("wq", "wk", "wv", "wo"))
  q = np.einsum("sd,dhk->shk", x, wq)
  k = np.einsum("sd,dhk->shk", x, wk)
  v = np.einsum("sd,dhk->shk", x, wv)
  if rope_theta is not None:
    q, k = _rope_oracle(q, np.arange(LEN), rope_theta), _rope_oracle(k, np.arange(LEN), rope_theta)
  heads = np.zeros((LEN, HEADS, HEAD_DIM))
  for h in range(HEADS):
    kh = h // (HEADS // KV_HEADS)
    for i in range(LEN):
      s = k[:i + 1, kh] @ q[i, h] / np.sqrt(HEAD_DIM)
      w = np.exp(s - s.max())
      heads[i, h] = (w / w.sum()) @ v[:i + 1, kh]
  expected = np.einsum("shk,hkd->sd", heads, wo)
  got = layer(jnp.asarray(x[None]))[0]
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=2e-5)


def test_layer_is_causal_for_every_kind():
  """Changing the last token changes no earlier output."""
  x = inputs(jnp.float32, batch=1)
  y = x.at[:, -1].add(3.0)
  for name in KIND_OPTIONS:
    layer = make_layer(name)
    a, b = layer(x), layer(y)
    chex.assert_trees_all_close(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])


def test_decode_errors_name_the_fix():
  layer = make_layer("dense")
  x = inputs(jnp.float32)
  with pytest.raises(ValueError, match="init_cache"):
    layer(x[:, :1], decode=True)
  layer.init_cache(2, 4)
  layer(x[:, :3], decode=True)
  with pytest.raises(ValueError, match="max_len=4"):
    layer(x[:, :2], decode=True)
  assert int(layer.cache_index[...]) == 3          # nothing was written
  with pytest.raises(ValueError, match="batch"):
    layer(x[:1, :1], decode=True)


def test_traced_decode_past_max_len_gives_nan_not_a_wrapped_answer():
  layer = make_layer("dense")
  layer.init_cache(2, 4)
  graphdef, cache, params = nnx.split(layer, nnx.Cache, ...)

  @jax.jit
  def step(c, t):
    m = nnx.merge(graphdef, c, params)
    return m(t, decode=True), nnx.state(m, nnx.Cache)

  x = inputs(jnp.float32)
  out, cache = step(cache, x[:, :3])
  assert np.all(np.isfinite(out))
  out, cache = step(cache, x[:, 3:5])                  # positions 3, 4 of max_len 4
  assert np.all(np.isnan(out))


def test_constructor_errors():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="kind="):
    layers.Attention(32, 4, 2, kind="linear", rngs=rngs)
  with pytest.raises(ValueError, match="window="):
    layers.Attention(32, 4, 2, kind="sliding", rngs=rngs)
  with pytest.raises(ValueError, match="p= is not an option"):
    layers.Attention(32, 4, 2, kind="dense", rngs=rngs, p=0.5)
  with pytest.raises(ValueError, match="num_kv_heads"):
    layers.Attention(32, 4, 3, kind="dense", rngs=rngs)
  with pytest.raises(ValueError, match="head_dim"):
    layers.Attention(30, 4, 2, kind="dense", rngs=rngs)
  with pytest.raises(ValueError, match="search_key"):
    layers.Attention(32, 4, 2, kind="superlinear", rngs=rngs, search_key="q")
  with pytest.raises(ValueError, match="remat="):
    layers.Attention(32, 4, 2, kind="superlinear", rngs=rngs, remat=1)
  upper = attn.BlockLayout.from_mask(np.ones((8, 8), bool), block_q=4, block_k=4)
  with pytest.raises(ValueError, match="layout= must be causal"):
    layers.Attention(32, 4, 2, kind="block_sparse", rngs=rngs, layout=upper)
  late = attn.BlockLayout.causal(4, kv_len=8)                 # queries at 4..7
  with pytest.raises(ValueError, match="layout= must be causal"):
    layers.Attention(32, 4, 2, kind="block_sparse", rngs=rngs, layout=late)
  layer = make_layer("block_sparse")
  with pytest.raises(ValueError, match="max_len"):
    layer.init_cache(1, LEN + 1)


def test_superlinear_layer_passes_remat_to_the_op(monkeypatch):
  """`remat=True` reaches `attn.superlinear_attention` (default False)."""
  seen = []
  real = attn.ops.superlinear_attention
  def spy(*a, **kw):
    seen.append(kw["remat"])
    return real(*a, **kw)
  monkeypatch.setattr(attn.ops, "superlinear_attention", spy)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 32))
  for remat in (False, True):
    layers.Attention(32, 4, 2, kind="superlinear", rngs=nnx.Rngs(0), remat=remat)(x)
  assert seen == [False, True]


def _mha(attention_fn=None, decode=False):
  kw = {} if attention_fn is None else dict(attention_fn=attention_fn)
  return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D_MODEL, qkv_features=D_MODEL,
                                decode=decode, rngs=nnx.Rngs(3), **kw)


@pytest.mark.parametrize("kind,options,visible", [
    ("dense", {}, lambda i, j: j <= i),
    ("sliding", dict(window=3), lambda i, j: (j <= i) & (i - j < 3)),
])
def test_attention_fn_matches_flax_with_the_same_mask(kind, options, visible):
  """Oracle: flax's own dot_product_attention under the explicit mask."""
  x = inputs(jnp.float32)
  ours = _mha(layers.attention_fn(kind, **options))(x)
  i, j = np.arange(LEN)[:, None], np.arange(LEN)[None, :]
  mask = jnp.asarray(visible(i, j))[None, None]
  theirs = _mha()(x, mask=mask)
  chex.assert_trees_all_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_attention_fn_refuses_decode_and_masks():
  x = inputs(jnp.float32)
  mha = _mha(layers.attention_fn("ppa", p=0.5, window=4), decode=True)
  mha.init_cache(x[:, :1].shape)
  with pytest.raises(ValueError, match="attn.layers.Attention"):
    mha(x[:, :1])
  with pytest.raises(ValueError, match="no mask"):
    _mha(layers.attention_fn("dense"))(x, mask=jnp.ones((1, 1, LEN, LEN), bool))


def test_model_parameter_paths_are_those_of_older_checkpoints():
  """train/model.py's attention moved into attn.layers with the same
  attribute names, so checkpoints written before the move restore: the
  parameter paths (the checkpoint's keys) are the ones the model had."""
  from train.model import ModelConfig, Transformer
  m = Transformer(ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=8, mlp_dim=48, window=4,
                              layer_pattern=("sliding", "superlinear"),
                              search_key="accumulated",
                              superlinear=attn.SuperlinearConfig(sw_index=1)),
                  rngs=nnx.Rngs(0))
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  per_block = ("attn_norm/scale", "mlp_norm/scale", "mlp/w_gate", "mlp/w_up", "mlp/w_down",
               "attention/wq", "attention/wk", "attention/wv", "attention/wo")
  expected = ({"embedding", "final_norm/scale"}
              | {f"blocks/{i}/{n}" for i in (0, 1) for n in per_block}
              | {f"blocks/1/attention/{n}" for n in ("wq_search", "w_gate", "b_gate")})
  assert paths == expected
  # Caches are nnx.Cache variables, never parameters (not in checkpoints).
  m.init_cache(1, 8)
  assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))} == expected
