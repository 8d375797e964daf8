"""Autoregressive decoding with a fixed-size KV cache.

`generate` gives a copy of the model (shared parameters) the layers' KV
caches (`Transformer.init_cache`, i.e. `attn.layers.Attention.init_cache`),
prefills the prompt in one call of `model(prompt, decode=True)` and then
feeds one token at a time. Every layer attends with the same `attn` op as in
training: q of length 1, the whole cache buffer `[batch, max_len, ...]` as
k/v and `q_offset` = the cache index (keys beyond it are masked by the op),
so the cache has one shape for the whole generation and the decode step
compiles once per `(batch, max_len)`.

Where the attention implementation resolves to `"pallas"` (the model's
`attn_implementation`, or `generate(..., implementation="pallas")`), the
`ppa` and `superlinear` layers of every step of at most
`attn.pallas.decode.MAX_QUERIES` tokens (each generated token, and
a short prompt) run the Pallas decode kernels: a token then reads
`O(w + t^p)` (PPA) or `O(sqrt(t))` (superlinear) cache rows instead of the
whole cache; docs/kernels_decode.md.

The jitted step takes the model as `nnx.split` (graphdef static; the cache
and the parameters traced, the cache donated): no global state, no
recompilation when the parameters change.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from train.model import IMPLEMENTATIONS, Transformer

__all__ = ["generate", "sample_token", "with_implementation"]


def sample_token(logits, rng, *, temperature: float):
  """logits: float32 `[batch, vocab]` -> int32 `[batch]`.

  `temperature == 0` is greedy (argmax, lowest index on ties); otherwise a
  sample from `softmax(logits / temperature)` with `rng`.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"),
                   donate_argnames=("cache",))
def _step(graphdef, cache, params, tokens, rng, *, temperature):
  """One cached forward over `tokens [batch, n]` (appended to the caches);
  samples the next token.

  Returns `(next_token int32 [batch], updated cache state)`.
  """
  model = nnx.merge(graphdef, cache, params)
  logits = model(tokens, decode=True)
  return sample_token(logits[:, -1], rng, temperature=temperature), nnx.state(model, nnx.Cache)


def with_implementation(model: Transformer, implementation) -> Transformer:
  """The same model (shared parameters) whose layers call the `attn` ops with
  `implementation` ("reference", "xla", "pallas" or None = best available)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: must be one of "
                     f"{IMPLEMENTATIONS}.")
  if model.config.attn_implementation == implementation:
    return model
  config = dataclasses.replace(model.config, attn_implementation=implementation)
  clone = nnx.merge(*nnx.split(model))
  clone.config = config
  for block in clone.blocks:
    block.attention.implementation = implementation
  return clone


_KEEP = object()


def generate(model: Transformer, prompt, *, max_new_tokens: int, rng,
             temperature: float = 0.0, max_len: int | None = None,
             implementation=_KEEP):
  """Extend `prompt` by `max_new_tokens` tokens.

  Args:
    model: a `train.model.Transformer`.
    prompt: int32 `[batch, prompt_len]`, `prompt_len >= 1`.
    max_new_tokens: number of tokens to generate (>= 0).
    rng: PRNG key; step `i` samples with `fold_in(rng, i)` (unused when greedy).
    temperature: 0.0 = greedy; > 0 samples from the tempered softmax.
    max_len: cache length (>= prompt_len + max_new_tokens; default equal).
    implementation: attention implementation of the cached steps; default the
      model's own `attn_implementation`. With "pallas" the PPA and
      superlinear layers decode with the Pallas kernels.

  Returns:
    int32 `[batch, prompt_len + max_new_tokens]`: the prompt then the new tokens.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, prompt_len >= 1], got {prompt.shape}")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer token ids, got {prompt.dtype}")
  prompt = prompt.astype(jnp.int32)
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 0")
  temperature = float(temperature)
  if not temperature >= 0.0:
    raise ValueError(f"temperature={temperature!r}: must be >= 0")
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  max_len = total if max_len is None else max_len
  if max_len < total:
    raise ValueError(f"max_len={max_len} < prompt_len + max_new_tokens = {total}")
  if max_new_tokens == 0:
    return prompt

  if implementation is not _KEEP:
    model = with_implementation(model, implementation)
  model = nnx.merge(*nnx.split(model))    # the caller's model gets no cache
  model.init_cache(batch, max_len)
  graphdef, cache, params = nnx.split(model, nnx.Cache, ...)
  token, cache = _step(graphdef, cache, params, prompt, jax.random.fold_in(rng, 0),
                       temperature=temperature)
  out = [token]
  for i in range(1, max_new_tokens):
    token, cache = _step(graphdef, cache, params, token[:, None],
                         jax.random.fold_in(rng, i), temperature=temperature)
    out.append(token)
  return jnp.concatenate([prompt, jnp.stack(out, axis=1)], axis=1)
