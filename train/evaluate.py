"""Held-out evaluation of a byte-level language model: bits per byte.

`token_nll(model, tokens)` is the per-position negative log-likelihood (nats)
of next-byte prediction; bits per byte is its mean over all predicted
positions divided by ln 2 (vocabulary 256, one token per byte).

`HeldoutEval(trainer, config)` holds `config.eval_batches` fixed held-out
batches (`train.data.heldout_batches`) as global arrays laid out like the
training batches, and a jitted sum; calling it with the train state's params
returns the held-out bits per byte (the same number on every process).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import data as data_lib
from train import sharding as shd

LN2 = math.log(2.0)


def token_nll(model, tokens: jax.Array) -> jax.Array:
  """tokens: int32 `[batch, seq + 1]` -> float32 `[batch, seq]` NLL in nats.

  Position `t` of the result is `-log p(tokens[:, t + 1] | tokens[:, :t + 1])`.
  """
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def bits_per_byte(nll_sum: float, count: int) -> float:
  """Mean NLL in nats (`nll_sum / count`) as bits per byte."""
  if count <= 0:
    raise ValueError(f"count={count}: need at least one predicted byte")
  return float(nll_sum) / count / LN2


def make_nll_fn(graphdef):
  """Jitted `(params, rest, tokens [b, s + 1]) -> float32 NLL [b, s]`."""

  @jax.jit
  def nll(params, rest, tokens):
    return token_nll(nnx.merge(graphdef, params, rest), tokens)

  return nll


class HeldoutEval:
  """Held-out bits per byte of a `train.loop.Trainer`'s state.

  The batches have `config.batch_size // config.grad_accum` rows (the
  micro-batch, so memory stays that of a training step) of `seq_len + 1`
  bytes and are built once.
  """

  def __init__(self, trainer, config):
    self.trainer = trainer
    local = data_lib.heldout_batches(config, config.eval_batches, **trainer.data_shard())
    self.batches = [trainer.global_batch(b) for b in local]
    self.count = sum(math.prod(b["targets"].shape) for b in self.batches)
    rep = shd.replicated(trainer.mesh)

    def nll_sum(params, rest, batch):
      logits = trainer.logits(params, rest, batch["inputs"]).astype(jnp.float32)
      return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                     batch["targets"]))

    self._sum = jax.jit(
        nll_sum, in_shardings=(trainer.param_shardings, trainer.rest_shardings,
                               trainer.batch_sharding), out_shardings=rep)

  def __call__(self, params, rest) -> float:
    total = 0.0
    for tokens in self.batches:
      total += float(jax.device_get(self._sum(params, rest, tokens)))
    return bits_per_byte(total, self.count)


def bucket_edges(max_len: int, base: int = 128, factor: int = 4) -> list[int]:
  """Context-position bucket edges `[0, base, base*factor, ...]` up to `max_len`.

  The last edge is `max_len` itself: e.g. `(3072)` -> `[0, 128, 512, 2048, 3072]`.
  """
  if max_len < 1:
    raise ValueError(f"max_len={max_len}: must be >= 1")
  edges = [0]
  edge = base
  while edge < max_len:
    edges.append(edge)
    edge *= factor
  edges.append(max_len)
  return edges


def bucket_bits(nll: np.ndarray, edges) -> list[dict]:
  """Per-bucket bits per byte of a per-position NLL array.

  nll: float `[n, seq]` (position `t` predicts byte `t + 1`, i.e. it has `t + 1`
  bytes of context); edges: increasing ints, the last `<= seq`.
  Returns one dict per bucket `[lo, hi)`: `lo`, `hi`, `count`, `bits_per_byte`.
  """
  nll = np.asarray(nll, dtype=np.float64)
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    part = nll[:, lo:hi]
    out.append({"lo": int(lo), "hi": int(hi), "count": int(part.size),
                "bits_per_byte": bits_per_byte(part.sum(), part.size)})
  return out
