"""NIAH evaluation: exact-match accuracy over a depth x length grid."""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate_grid"]


def _eval_rng(seed: int, seq_len: int, depth_index: int, distractors: int = 0):
  """The fixed eval set of one grid cell (same for every variant)."""
  key = [seed, 2, seq_len, depth_index] + ([distractors] if distractors else [])
  return np.random.default_rng(key)


def _batches(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(n, start + size))


def evaluate_grid(model, task, *, lengths, depths, samples: int = 32,
                  seed: int = 1234, tokens_per_batch: int = 16384,
                  distractors: int = 0) -> np.ndarray:
  """Exact-match accuracy of `model` over a depth x length grid.

  Args:
    model: a `Transformer` (`model(tokens) -> logits [batch, seq, vocab]`).
    task: `PasskeyTask` or `TextNeedleTask` (held-out haystacks).
    lengths: int `[nl]` sequence lengths.
    depths: float `[nd]` needle depths in [0, 1].
    samples: sequences per cell (drawn from `_eval_rng(seed, L, depth_index)`,
      so every model sees the same eval set).
    seed: eval-set seed.
    tokens_per_batch: forward batch size is `max(1, tokens_per_batch // L)`.
    distractors: distractor needles per sequence (multi-key NIAH).

  Returns:
    float64 `[nd, nl]` accuracies in [0, 1] (rows: depths, columns: lengths).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, params = nnx.split(model)

  @jax.jit
  def predict(params, tokens):
    return jnp.argmax(nnx.merge(graphdef, params)(tokens)[:, -1], axis=-1)

  grid = np.zeros((len(depths), len(lengths)))
  for li, seq_len in enumerate(lengths):
    cells = [task.batch(_eval_rng(seed, seq_len, di, distractors), samples, seq_len, depth,
                        split="heldout", distractors=distractors)
             for di, depth in enumerate(depths)]
    tokens = np.concatenate([c.tokens for c in cells])
    targets = np.concatenate([c.targets for c in cells])
    preds = np.concatenate([
        np.asarray(predict(params, jnp.asarray(tokens[sl])))
        for sl in _batches(len(tokens), max(1, tokens_per_batch // seq_len))])
    grid[:, li] = (preds == targets).reshape(len(depths), samples).mean(axis=1)
  return grid
