"""Tests of train.decode: KV-cache prefill/decode against the full forward pass."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.model_cases import ATTENTION_KW
from train.decode import generate
from train.model import ModelConfig, Transformer

VOCAB = 53
PROMPT = 6
NEW = 10


def tiny_model(seed=0, **kw) -> Transformer:
  """One layer (two for hybrid patterns): compile time dominates these tests."""
  base = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
              num_kv_heads=2, head_dim=8, mlp_dim=48)
  if kw.get("layer_pattern"):
    base["num_layers"] = len(kw["layer_pattern"])
  base.update(kw)
  return Transformer(ModelConfig(**base), rngs=nnx.Rngs(seed))


def sharpen(model: Transformer, factor: float = 4.0) -> Transformer:
  """Scale every query/key projection: peaked, position-sensitive attention.

  At init the scores are small and attention is nearly uniform, so a wrong
  position or a stale cache entry hardly moves the argmax; sharp attention
  makes the greedy comparisons sensitive to them.
  """
  for block in model.blocks:
    layer = block.attention
    for name in ("wq", "wk", "wq_search"):
      if hasattr(layer, name):
        param = getattr(layer, name)
        param[...] = param[...] * factor
  return model


@functools.cache
def built(name: str):
  """(model, jitted forward) of `ATTENTION_KW[name]`, seed 0, shared by tests."""
  model = sharpen(tiny_model(tie_embeddings=False, **ATTENTION_KW[name]))
  return model, jit_forward(model)


def jit_forward(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: fn(state, tokens)


def jit_cached(model, batch, max_len):
  """A jitted `tokens -> logits` decode step of a copy of `model` with fresh
  caches of `max_len`; returns `(step, caches)`, `caches()` the cache state."""
  model = nnx.merge(*nnx.split(model))
  model.init_cache(batch, max_len)
  graphdef, cache, params = nnx.split(model, nnx.Cache, ...)

  @jax.jit
  def fn(c, p, t):
    m = nnx.merge(graphdef, c, p)
    return m(t, decode=True), nnx.state(m, nnx.Cache)

  box = [cache]

  def step(tokens):
    logits, box[0] = fn(box[0], params, tokens)
    return logits

  return step, lambda: nnx.merge(graphdef, box[0], params)


def prompt_tokens(seed, batch=2, length=PROMPT):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, jnp.int32)


@pytest.mark.parametrize("name", list(ATTENTION_KW))
def test_greedy_generate_matches_full_forward_argmax(name):
  """Each new token = argmax of the full model's last logits on the sequence so far.

  The full model runs once on the final sequence: by causality (tested in
  test_model) its logits at position i are those of the prefix [0, i].
  """
  model, forward = built(name)
  prompt = prompt_tokens(1)
  out = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(0))
  chex.assert_shape(out, (2, PROMPT + NEW))
  chex.assert_type(out, jnp.int32)
  chex.assert_trees_all_equal(out[:, :PROMPT], prompt)
  logits = forward(out)
  expected = jnp.argmax(logits[:, PROMPT - 1:-1], axis=-1)
  chex.assert_trees_all_equal(out[:, PROMPT:], expected.astype(jnp.int32))


def test_greedy_generate_matches_growing_sequence_rerun():
  """Literal check: re-run the (eager) model on each prefix."""
  model, _ = built("dense")
  prompt = prompt_tokens(2, batch=1, length=3)
  out = generate(model, prompt, max_new_tokens=3, rng=jax.random.key(0))
  seq = prompt
  for _ in range(3):
    nxt = jnp.argmax(model(seq)[:, -1], axis=-1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  chex.assert_trees_all_equal(out, seq)


@pytest.mark.parametrize("name", ["dense", "ppa", "superlinear_acc", "hybrid"])
def test_cached_logits_match_full_forward(name):
  """Prefill into a larger buffer, then token by token: logits == full forward."""
  model, forward = built(name)
  tokens = prompt_tokens(3, length=16)
  full = forward(tokens)
  cached, cached_model = jit_cached(model, batch=2, max_len=20)
  logits = cached(tokens[:, :PROMPT])
  chex.assert_trees_all_close(logits, full[:, :PROMPT], atol=1e-5, rtol=1e-5)
  steps = [cached(tokens[:, i:i + 1]) for i in range(PROMPT, 16)]
  chex.assert_trees_all_close(jnp.concatenate(steps, 1), full[:, PROMPT:],
                              atol=1e-5, rtol=1e-5)
  # The buffers hold exactly the written positions.
  layer = cached_model().blocks[0].attention
  assert int(layer.cache_index[...]) == 16
  assert not np.any(np.asarray(layer.cached_key[...][:, 16:]))
  assert np.all(np.any(np.asarray(layer.cached_key[...][:, :16]) != 0, axis=(-1, -2)))
  if name == "superlinear_acc":
    chex.assert_shape(layer.search_state[...], (2, 2, 8))
    assert np.any(np.asarray(layer.cached_search_key[...][:, :16]) != 0)
  else:
    assert not hasattr(layer, "search_state")


def test_batch_rows_are_independent_and_max_len_is_free():
  """Row 1 alone, in a longer cache buffer, decodes as it does in the batch."""
  model, _ = built("superlinear_acc")
  prompt = prompt_tokens(4)
  out = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(0))
  row = generate(model, prompt[1:2], max_new_tokens=NEW, rng=jax.random.key(0),
                 max_len=PROMPT + NEW + 9)
  chex.assert_trees_all_equal(row, out[1:2])


def test_sampling_is_reproducible_and_depends_on_rng():
  model, _ = built("dense")
  prompt = prompt_tokens(5)
  a = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(1), temperature=2.0)
  b = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(1), temperature=2.0)
  c = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(2), temperature=2.0)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a, c)
  assert int(a.min()) >= 0 and int(a.max()) < VOCAB
  greedy = generate(model, prompt, max_new_tokens=NEW, rng=jax.random.key(1))
  assert not np.array_equal(a, greedy)


def test_bfloat16_generate_runs():
  model = tiny_model(dtype="bfloat16", **ATTENTION_KW["hybrid"])
  out = generate(model, prompt_tokens(6), max_new_tokens=4, rng=jax.random.key(0))
  chex.assert_shape(out, (2, PROMPT + 4))
  assert model.config.compute_dtype == jnp.bfloat16
  model.init_cache(1, 4)
  assert model.blocks[0].attention.cached_key[...].dtype == jnp.bfloat16


def test_generate_argument_checks():
  model, _ = built("dense")
  prompt = prompt_tokens(7)
  chex.assert_trees_all_equal(
      generate(model, prompt, max_new_tokens=0, rng=jax.random.key(0)), prompt)
  with pytest.raises(ValueError, match="max_len"):
    generate(model, prompt, max_new_tokens=4, rng=jax.random.key(0), max_len=PROMPT + 3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, prompt, max_new_tokens=-1, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="prompt"):
    generate(model, prompt[0], max_new_tokens=2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="temperature"):
    generate(model, prompt, max_new_tokens=2, rng=jax.random.key(0), temperature=-1.0)
