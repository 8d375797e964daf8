"""Tests of train.model: config validation, parameters, forward behaviour."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model_cases import ATTENTION_KW
from train import model as model_lib
from train.model import LOGICAL_AXES, ModelConfig, Transformer

VOCAB = 61
SEQ = 24


def tiny_config(**kw) -> ModelConfig:
  """One layer (two for hybrid patterns): compile time dominates these tests."""
  base = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
              num_kv_heads=2, head_dim=8, mlp_dim=48)
  if kw.get("layer_pattern"):
    base["num_layers"] = len(kw["layer_pattern"])
  base.update(kw)
  return ModelConfig(**base)


def jit_forward(model):
  """Jitted `tokens -> logits` of a fixed model (graphdef static)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: fn(state, tokens)


@functools.cache
def built(name: str):
  """(model, jitted forward) of `ATTENTION_KW[name]`, seed 0, shared by tests."""
  model = Transformer(tiny_config(**ATTENTION_KW[name]), rngs=nnx.Rngs(0))
  return model, jit_forward(model)


def random_tokens(seed, shape=(2, SEQ)):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


# ----------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("d_model", -1), ("num_layers", 1.5), ("num_heads", True),
    ("num_kv_heads", 3), ("head_dim", 7), ("mlp_dim", 0), ("tie_embeddings", 1),
    ("rope_theta", 0.0), ("dtype", "float16"), ("attention", "linear"),
    ("layer_pattern", ("sliding", "mamba")), ("layer_pattern", ()),
    ("window", 0), ("ppa_p", 1.5), ("superlinear", {"sw_index": 1}),
    ("search_key", "v"), ("attn_implementation", "cuda"), ("search_rope", 1),
    ("search_memory", 1.0), ("superlinear_remat", "yes"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    ModelConfig(**{field: value})


def test_superlinear_remat_reaches_superlinear_layers_only():
  from train.model import layer_options
  on = ModelConfig(attention="superlinear", superlinear_remat=True)
  assert layer_options(on, "superlinear")["remat"] is True
  assert layer_options(ModelConfig(attention="superlinear"), "superlinear")["remat"] is False
  assert "remat" not in layer_options(on, "sliding")


def test_config_is_hashable_and_layer_pattern_repeats():
  c = ModelConfig(num_layers=6, layer_pattern="sliding, sliding,superlinear")
  assert c.layer_pattern == ("sliding", "sliding", "superlinear")
  assert c.layer_types == ("sliding", "sliding", "superlinear") * 2
  assert hash(c) == hash(ModelConfig(num_layers=6,
                                     layer_pattern=("sliding", "sliding", "superlinear")))
  assert ModelConfig(num_layers=3, attention="ppa").layer_types == ("ppa",) * 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.window = 3


# ----------------------------------------------------------------------------
# Parameters


def _param_names(model):
  """{path: logical names} of every nnx.Param."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    out["/".join(map(str, path))] = (var.get_metadata().get("out_sharding"),
                                     var[...].shape, var[...].dtype)
  return out


@pytest.mark.parametrize("tie", [True, False])
def test_every_param_has_logical_axes(tie):
  c = tiny_config(tie_embeddings=tie, num_layers=2, search_key="accumulated",
                  layer_pattern=("dense", "superlinear"))
  names = _param_names(Transformer(c, rngs=nnx.Rngs(0)))
  for path, (axes, shape, dtype) in names.items():
    assert axes is not None, path
    assert len(axes) == len(shape), path
    assert set(axes) <= set(LOGICAL_AXES), path
    assert dtype == jnp.float32, path
  expect = {
      "embedding": ("vocab", "embed"),
      "final_norm/scale": ("norm",),
      "blocks/0/attention/wq": ("embed", "q_heads", "head_dim"),
      "blocks/0/attention/wk": ("embed", "kv_heads", "head_dim"),
      "blocks/0/attention/wv": ("embed", "kv_heads", "head_dim"),
      "blocks/0/attention/wo": ("q_heads", "head_dim", "embed"),
      "blocks/0/mlp/w_up": ("embed", "mlp"),
      "blocks/0/mlp/w_gate": ("embed", "mlp"),
      "blocks/0/mlp/w_down": ("mlp", "embed"),
      "blocks/1/attention/wq_search": ("embed", "q_heads", "head_dim"),
      "blocks/1/attention/w_gate": ("embed", "kv_heads"),
      "blocks/1/attention/b_gate": ("kv_heads",),
  }
  for path, axes in expect.items():
    assert names[path][0] == axes, path
  # Only superlinear layers route; only accumulated ones have the gate.
  assert "blocks/0/attention/wq_search" not in names
  assert "blocks/0/attention/w_gate" not in names
  assert ("lm_head" in names) == (not tie)
  if not tie:
    assert names["lm_head"][0] == ("embed", "vocab")
  assert names["blocks/0/attention/wq"][1] == (32, 4, 8)
  assert names["blocks/0/attention/wk"][1] == (32, 2, 8)


def test_logical_axis_rules_shard_params_on_a_mesh():
  mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("vocab", "tensor"), ("embed", "fsdp"), ("q_heads", "tensor"),
           ("kv_heads", "tensor"), ("mlp", "tensor"), ("head_dim", None),
           ("norm", None))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    m = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    spec = m.blocks[0].attention.wq[...].sharding.spec
    embed_spec = m.embedding[...].sharding.spec
  assert tuple(spec) == ("fsdp", "tensor", None)
  assert tuple(embed_spec) == ("tensor", "fsdp")


def test_init_is_a_function_of_the_seed():
  c = tiny_config()
  a = nnx.state(Transformer(c, rngs=nnx.Rngs(3)), nnx.Param)
  b = nnx.state(Transformer(c, rngs=nnx.Rngs(3)), nnx.Param)
  d = nnx.state(Transformer(c, rngs=nnx.Rngs(4)), nnx.Param)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["embedding"][...], d["embedding"][...])


# ----------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("name", list(ATTENTION_KW))
def test_forward_shape_and_causality(name):
  """Changing token j changes no logit before j, and does change logits at j."""
  _, fwd = built(name)
  tokens = random_tokens(1)
  logits = fwd(tokens)
  chex.assert_shape(logits, (2, SEQ, VOCAB))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  for j in (SEQ // 2, SEQ - 3):
    changed = tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB)
    other = fwd(changed)
    chex.assert_trees_all_close(other[:, :j], logits[:, :j], atol=1e-6, rtol=1e-6)
    assert not np.allclose(other[:, j], logits[:, j], atol=1e-4)


def test_masked_types_differ_from_dense_with_same_params():
  """Same weights (same seed, same structure), another mask: only far keys differ."""
  tokens = random_tokens(2)
  dense = built("dense")[1](tokens)
  for name in ("sliding", "ppa"):
    out = built(name)[1](tokens)
    # Within the first `window` = 4 positions both masks are the full causal one.
    chex.assert_trees_all_close(out[:, :4], dense[:, :4], atol=1e-5)
    assert not np.allclose(out[:, -1], dense[:, -1], atol=1e-3), name


def test_rope_is_relative_and_norm_preserving():
  kq, kk = jax.random.split(jax.random.key(0))
  q = jax.random.normal(kq, (1, 1, 2, 16))
  k = jax.random.normal(kk, (1, 1, 2, 16))

  def score(m, n):
    rq = model_lib.apply_rope(q, jnp.array([m]), theta=10_000.0)
    rk = model_lib.apply_rope(k, jnp.array([n]), theta=10_000.0)
    return jnp.sum(rq * rk, axis=-1)

  chex.assert_trees_all_close(score(7, 3), score(104, 100), atol=1e-4)
  chex.assert_trees_all_close(score(0, 0), jnp.sum(q * k, -1), atol=1e-5)
  assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)
  rq = model_lib.apply_rope(q, jnp.array([1234]), theta=10_000.0)
  chex.assert_trees_all_close(jnp.linalg.norm(rq, axis=-1),
                              jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # Batched positions [batch, seq] agree with shared positions [seq].
  x = jax.random.normal(kq, (2, 5, 3, 8))
  pos = jnp.arange(5, dtype=jnp.int32) + 9
  chex.assert_trees_all_close(
      model_lib.apply_rope(x, pos, theta=500.0),
      model_lib.apply_rope(x, jnp.stack([pos, pos]), theta=500.0))


def _scan_loop(gates, values, initial):
  gates, values = np.asarray(gates, np.float64), np.asarray(values, np.float64)
  h = np.zeros(values.shape[:1] + values.shape[2:]) if initial is None else np.asarray(initial)
  out = []
  for t in range(values.shape[1]):
    a = gates[:, t, :, None]
    h = a * h + (1.0 - a) * values[:, t]
    out.append(h)
  return np.stack(out, axis=1)


@pytest.mark.parametrize("with_initial", [False, True])
def test_gated_linear_scan_matches_loop(with_initial):
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  gates = jax.nn.sigmoid(jax.random.normal(k1, (2, 13, 3)))
  values = jax.random.normal(k2, (2, 13, 3, 4))
  initial = jax.random.normal(k3, (2, 3, 4)) if with_initial else None
  scan = jax.jit(model_lib.gated_linear_scan)
  h = scan(gates, values, initial)
  chex.assert_shape(h, (2, 13, 3, 4))
  chex.assert_trees_all_close(h, _scan_loop(gates, values, initial), atol=1e-5)
  # Chunked: scanning the tail from the head's last state = one full scan.
  head = scan(gates[:, :6], values[:, :6], initial)
  tail = scan(gates[:, 6:], values[:, 6:], head[:, -1])
  chex.assert_trees_all_close(jnp.concatenate([head, tail], 1), h, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
  """num_kv_heads=2 of 4 query heads: query head h reads kv head h // 2."""
  gqa = Transformer(tiny_config(num_kv_heads=2), rngs=nnx.Rngs(0))
  mha = Transformer(tiny_config(num_kv_heads=4), rngs=nnx.Rngs(1))
  state = nnx.state(gqa, nnx.Param)
  mha_state = nnx.state(mha, nnx.Param)

  def copy(path_value):
    path, var = path_value
    value = var[...]
    if path[-1] in ("wk", "wv"):
      value = jnp.repeat(value, 2, axis=1)
    return path, value

  flat = dict(copy(pv) for pv in nnx.to_flat_state(state))
  for path, var in nnx.to_flat_state(mha_state):
    var[...] = flat[path]
  nnx.update(mha, mha_state)
  tokens = random_tokens(3)
  chex.assert_trees_all_close(jit_forward(mha)(tokens), jit_forward(gqa)(tokens),
                              atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_close_to_float32():
  tokens = random_tokens(4)
  bf16 = Transformer(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
  out32, out16 = built("dense")[1](tokens), jit_forward(bf16)(tokens)
  chex.assert_type(out16, jnp.float32)
  for _, var in nnx.to_flat_state(nnx.state(bf16, nnx.Param)):
    assert var[...].dtype == jnp.float32
  scale = float(jnp.std(out32))
  assert float(jnp.max(jnp.abs(out16 - out32))) < 0.15 * scale
  assert not np.array_equal(out16, out32)


def test_accumulated_search_key_routes_through_the_gate():
  """The gate parameters reach the loss (through the superlinear gating)."""
  m = Transformer(tiny_config(**ATTENTION_KW["superlinear_acc"]), rngs=nnx.Rngs(0))
  tokens = random_tokens(6, (2, 32))

  @nnx.jit
  @nnx.grad
  def grad_fn(model):
    logits = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

  grads = grad_fn(m)
  for name in ("w_gate", "b_gate", "wq_search"):
    g = getattr(grads.blocks[0].attention, name)[...]
    chex.assert_tree_all_finite(g)
    assert float(jnp.max(jnp.abs(g))) > 0.0, name


@pytest.mark.parametrize("memory", [2.0, 32.0, 500.0])
def test_search_memory_sets_the_initial_decay(memory):
  """The scan gate starts at `1 - 1 / search_memory` for a zero input."""
  m = Transformer(tiny_config(**ATTENTION_KW["superlinear_acc"], search_memory=memory),
                  rngs=nnx.Rngs(0))
  bias = np.asarray(m.blocks[0].attention.b_gate[...])
  np.testing.assert_allclose(1.0 / (1.0 + np.exp(-bias)), 1.0 - 1.0 / memory, rtol=1e-5)


@pytest.mark.parametrize("memory", [1.0, 0.5, float("inf"), True])
def test_search_memory_rejects_bad_values(memory):
  with pytest.raises(ValueError, match="search_memory"):
    tiny_config(**ATTENTION_KW["superlinear_acc"], search_memory=memory)


def _search_inputs(config, shift):
  """(q, k, q_search, k_search) of the first layer for positions shifted by `shift`."""
  m = Transformer(config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 16, config.d_model))
  positions = jnp.arange(16, dtype=jnp.int32) + shift
  q, k, _, qs, ks, _ = m.blocks[0].attention.project(x, positions)
  return q, k, qs, ks


@pytest.mark.parametrize("search_rope", [False, True])
def test_accumulated_search_is_content_addressed_unless_search_rope(search_rope):
  """Without `search_rope` the routing query and accumulated key do not depend
  on absolute position (RoPE would rotate them); q and k always do."""
  config = tiny_config(**ATTENTION_KW["superlinear_acc"], search_rope=search_rope)
  q0, k0, qs0, ks0 = _search_inputs(config, 0)
  q1, k1, qs1, ks1 = _search_inputs(config, 100)
  assert not np.allclose(q0, q1) and not np.allclose(k0, k1)
  same = np.allclose(qs0, qs1, atol=1e-6) and np.allclose(ks0, ks1, atol=1e-6)
  assert same == (not search_rope)
  # Either way a search score depends on positions only through their offset.
  group = config.num_heads // config.num_kv_heads

  def score(qs, ks):  # query 9 against key 3, every query head vs its kv head
    return jnp.einsum("bhd,bhd->bh", qs[:, 9], jnp.repeat(ks[:, 3], group, axis=1))

  np.testing.assert_allclose(score(qs0, ks0), score(qs1, ks1), rtol=1e-4, atol=1e-4)


def test_search_key_k_always_ropes_the_routing_query():
  config = tiny_config(**ATTENTION_KW["superlinear"])
  _, _, qs0, ks0 = _search_inputs(config, 0)
  _, _, qs1, _ = _search_inputs(config, 100)
  assert ks0 is None and not np.allclose(qs0, qs1)
