"""Needle-in-a-haystack (NIAH): generators, small trainer, depth x length eval.

    python -m eval.niah --preset quick|routing|passkey [--out DIR] [--name NAME]
                        [--steps N] [--variants V ...] [--seeds S ...] ...

trains one small `train.model.Transformer` per (variant, seed) at
`--train-len` tokens, evaluates exact-match accuracy over a depth x length
grid, and writes (all under `--out`, file names prefixed by `--name`):

- `<name>.json`: settings and one entry per finished (variant, seed), rewritten
  atomically after each one; a rerun skips the entries already there, so an
  interruption loses at most the run in progress.
- `<name>_<variant>.png`: Kamradt-style heatmap (depth % on y, length on x),
  mean accuracy over the seeds.
- `<name>.md`: the report (settings, table, heatmaps, span analysis). The text
  between `<!-- reading -->` and `<!-- /reading -->` of an existing report is
  kept when the report is rewritten (hand-written analysis).

Presets: `quick` (the README's main job: a real-text NIAH, a hybrid
sliding-window + superlinear model against sliding window alone, a few
minutes on a 2-core CPU), `routing` (L = 1024 real-text NIAH where the
superlinear layer must route; see docs/results.md), `passkey` (the synthetic
passkey comparison of routing keys behind docs/niah.md).

## Real-text task (`TextNeedleTask`, RULER style)

Token ids: `0..255` bytes, `256` MARKER, `257` QUERY, then `num_keys` key
tokens, then `num_values` value tokens. A sequence of length `L` is a window
of real text (the `train.data` corpus: the training split for training, the
held-out split for evaluation) with needles written over it:

    position:  ...  m       m+1  m+2    ...  d   d+1  d+2  ...  L-2    L-1
    token:     ...  MARKER  KEY  VALUE  ...  MARKER K'  V'  ...  QUERY  KEY

the needle at `m = round(depth * (L - 5))` (depth 0 = first token, depth 1 =
the VALUE sits just before QUERY), and in the multi-key variant
`distractors` more needles `(MARKER, K', V')` at other, non-overlapping
places with keys distinct from each other and from KEY and values other than
VALUE. The target (the token after the final KEY) is VALUE; loss at that
position (plus, with `lm_weight > 0`, the byte-prediction loss of the text);
accuracy is exact match of the argmax over the full vocabulary; chance is
`1 / num_values`.

## Passkey task (`PasskeyTask`, synthetic)

Token ids: `0` padding (never produced), `1` MARKER, `2` QUERY,
`3 .. 3 + num_filler - 1` filler, then `num_values` value tokens. A sequence
of length `L` is

    position:  0 ...  m       m+1     ...  L-2  L-1
    token:     f ...  MARKER  VALUE   f ... f   QUERY

with filler `f` drawn i.i.d. uniformly from the filler ids, the needle
`(MARKER, VALUE)` at marker position `m = round(depth * (L - 3))`, and the
target: the next token after QUERY is VALUE.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from typing import NamedTuple

import numpy as np

__all__ = [
    "NiahBatch", "PRESETS", "PasskeyTask", "TextNeedleTask", "VARIANTS", "evaluate_grid",
    "make_batch", "marker_positions", "model_config", "needle_anchor_hits", "plot_heatmap",
    "span_hits", "train_model",
]

# ----------------------------------------------------------------------------
# Task generator (pure numpy)


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
  """Token layout of the passkey task (see the module docstring).

  Attributes:
    num_filler: number of distinct haystack (filler) tokens.
    num_values: number of distinct passkey values (chance = 1 / num_values).
  """

  num_filler: int = 32
  num_values: int = 16

  PAD = 0
  MARKER = 1
  QUERY = 2

  def __post_init__(self):
    for name in ("num_filler", "num_values"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PasskeyTask.{name}={value!r}: must be an int >= 1.")

  @property
  def filler_ids(self) -> np.ndarray:
    """int32 `[num_filler]`: the haystack vocabulary."""
    return np.arange(3, 3 + self.num_filler, dtype=np.int32)

  @property
  def value_ids(self) -> np.ndarray:
    """int32 `[num_values]`: the passkey vocabulary (disjoint from the filler)."""
    start = 3 + self.num_filler
    return np.arange(start, start + self.num_values, dtype=np.int32)

  @property
  def vocab_size(self) -> int:
    return 3 + self.num_filler + self.num_values

  def batch(self, rng, batch: int, seq_len: int, depths=None, *, split: str = "train",
            distractors: int | None = None) -> "NiahBatch":
    """`make_batch` (the haystack is synthetic: `split` is ignored; no distractors)."""
    if distractors:
      raise ValueError("PasskeyTask has no distractor needles: use TextNeedleTask")
    return make_batch(rng, self, batch, seq_len, depths)


class NiahBatch(NamedTuple):
  """One batch of NIAH sequences.

  tokens: int32 `[batch, seq_len]`.
  targets: int32 `[batch]`, the value token (the answer after the final token).
  marker_pos: int32 `[batch]`, position of the needle's MARKER.
  depths: float64 `[batch]`, the needle's depth in [0, 1].
  value_pos: int32 `[batch]`, position of the needle's VALUE.
  distractor_pos: int32 `[batch, n]`, MARKER positions of distractor needles
    (`n = 0` for single-needle batches).
  """
  tokens: np.ndarray
  targets: np.ndarray
  marker_pos: np.ndarray
  depths: np.ndarray
  value_pos: np.ndarray | None = None
  distractor_pos: np.ndarray | None = None


def marker_positions(depths, seq_len: int) -> np.ndarray:
  """Depth fractions in [0, 1] -> int32 marker positions `round(depth * (L - 3))`.

  depths: float `[n]` (or scalar) -> int32 `[n]` (or scalar) in `[0, L - 3]`.
  """
  depths = np.asarray(depths, dtype=np.float64)
  if np.any((depths < 0) | (depths > 1)) or not np.all(np.isfinite(depths)):
    raise ValueError(f"depths must lie in [0, 1], got {depths}")
  return np.rint(depths * (seq_len - 3)).astype(np.int32)


def make_batch(rng: np.random.Generator, task: PasskeyTask, batch: int,
               seq_len: int, depths=None) -> NiahBatch:
  """Sample `batch` passkey sequences of length `seq_len` (>= 4).

  Args:
    rng: the only source of randomness (same state -> same batch).
    task: token layout.
    batch: number of sequences.
    seq_len: tokens per sequence, the final QUERY included.
    depths: None (marker position uniform over `[0, seq_len - 3]`), a float
      in [0, 1] for every sequence, or float `[batch]`.

  Returns:
    `NiahBatch` with tokens `[batch, seq_len]`, targets/marker_pos/depths
    `[batch]`.
  """
  if not isinstance(rng, np.random.Generator):
    raise TypeError("rng must be a numpy.random.Generator")
  if seq_len < 4:
    raise ValueError(f"seq_len={seq_len}: must be >= 4 (needle, one filler, query)")
  tokens = rng.choice(task.filler_ids, size=(batch, seq_len)).astype(np.int32)
  if depths is None:
    marker = rng.integers(0, seq_len - 2, size=batch).astype(np.int32)
  else:
    marker = np.broadcast_to(marker_positions(depths, seq_len), (batch,)).astype(np.int32)
  values = rng.choice(task.value_ids, size=batch).astype(np.int32)
  rows = np.arange(batch)
  tokens[rows, marker] = task.MARKER
  tokens[rows, marker + 1] = values
  tokens[:, -1] = task.QUERY
  return NiahBatch(tokens, values, marker, marker / (seq_len - 3), marker + 1,
                   np.zeros((batch, 0), np.int32))


@dataclasses.dataclass(frozen=True)
class TextNeedleTask:
  """Real-text NIAH, single key or multi-key with distractors (module docstring).

  Attributes:
    num_keys: distinct key tokens (> the number of distractors).
    num_values: distinct value tokens (chance = 1 / num_values).
    max_distractors: training draws 0..max_distractors distractor needles
      per batch (uniformly); evaluation sets the count explicitly.
    source: the haystack corpus, a `train.data` source ("shakespeare", ...).
  """

  num_keys: int = 16
  num_values: int = 16
  max_distractors: int = 0
  source: str = "shakespeare"

  MARKER = 256
  QUERY = 257
  NEEDLE_LEN = 3   # MARKER KEY VALUE

  def __post_init__(self):
    for name in ("num_keys", "num_values"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"TextNeedleTask.{name}={value!r}: must be an int >= 2.")
    if not 0 <= self.max_distractors < self.num_keys:
      raise ValueError(f"TextNeedleTask.max_distractors={self.max_distractors}: must be in "
                       f"[0, num_keys - 1] (distractor keys differ from the asked key)")

  @property
  def key_ids(self) -> np.ndarray:
    return np.arange(258, 258 + self.num_keys, dtype=np.int32)

  @property
  def value_ids(self) -> np.ndarray:
    start = 258 + self.num_keys
    return np.arange(start, start + self.num_values, dtype=np.int32)

  @property
  def vocab_size(self) -> int:
    return 258 + self.num_keys + self.num_values

  def marker_positions(self, depths, seq_len: int) -> np.ndarray:
    """Depths in [0, 1] -> int32 MARKER positions `round(depth * (L - 5))`."""
    depths = np.asarray(depths, dtype=np.float64)
    if np.any((depths < 0) | (depths > 1)) or not np.all(np.isfinite(depths)):
      raise ValueError(f"depths must lie in [0, 1], got {depths}")
    return np.rint(depths * (seq_len - 5)).astype(np.int32)

  def haystack(self, split: str) -> np.ndarray:
    from train import data as data_lib
    return data_lib.load_split(self.source, split)

  def batch(self, rng, batch: int, seq_len: int, depths=None, *, split: str = "train",
            distractors: int | None = None) -> NiahBatch:
    """Sample `batch` sequences of `seq_len` tokens.

    Args:
      rng: a `numpy.random.Generator`, the only source of randomness.
      batch, seq_len: shape (`seq_len >= 5 + 3 * distractors + 3`).
      depths: None (needle position uniform over `[0, L - 5]`), a float in
        [0, 1] or float `[batch]`.
      split: "train" or "heldout" haystack text.
      distractors: distractor needles per sequence (None: one count drawn
        uniformly in `[0, max_distractors]` for the whole batch).
    """
    if not isinstance(rng, np.random.Generator):
      raise TypeError("rng must be a numpy.random.Generator")
    if distractors is None:
      distractors = int(rng.integers(0, self.max_distractors + 1))
    if not 0 <= distractors < self.num_keys:
      raise ValueError(f"distractors={distractors}: must be in [0, num_keys - 1]")
    n = self.NEEDLE_LEN
    if seq_len < 5 + n * (distractors + 1):
      raise ValueError(f"seq_len={seq_len}: too short for {distractors + 1} needles "
                       "and the query")
    text = self.haystack(split)
    starts = rng.integers(0, len(text) - seq_len + 1, size=batch)
    tokens = text[starts[:, None] + np.arange(seq_len)].astype(np.int32)
    if depths is None:
      marker = rng.integers(0, seq_len - 4, size=batch).astype(np.int32)
    else:
      marker = np.broadcast_to(self.marker_positions(depths, seq_len), (batch,)).astype(np.int32)
    keys = rng.choice(self.key_ids, size=batch).astype(np.int32)
    values = rng.choice(self.value_ids, size=batch).astype(np.int32)
    dpos = np.zeros((batch, distractors), np.int32)
    for r in range(batch):
      free = np.ones(seq_len - 4, bool)            # admissible MARKER positions
      free[max(0, marker[r] - n + 1):marker[r] + n] = False
      other_keys = rng.permutation(self.key_ids[self.key_ids != keys[r]])[:distractors]
      for i in range(distractors):
        p = int(rng.choice(np.flatnonzero(free)))
        free[max(0, p - n + 1):p + n] = False
        dpos[r, i] = p
        tokens[r, p:p + n] = (self.MARKER, other_keys[i],
                              rng.choice(self.value_ids[self.value_ids != values[r]]))
    rows = np.arange(batch)
    tokens[rows, marker] = self.MARKER
    tokens[rows, marker + 1] = keys
    tokens[rows, marker + 2] = values
    tokens[:, -2] = self.QUERY
    tokens[:, -1] = keys
    return NiahBatch(tokens, values, marker, marker / (seq_len - 5), marker + 2, dpos)


# ----------------------------------------------------------------------------
# Model variants

# The passkey comparison's superlinear settings: a 15-key window (sw_index=3,
# W = 4**2 - 1) so that most needles lie outside it, two spans, the balanced
# p = sigma = 1/2 with the coverage-minimal backward factor 2.
SUPERLINEAR_KW = dict(sw_index=3, num_spans=2, search_power=0.5, span_power=0.5,
                      backward_factor=2.0, forward_factor=1.0)

# name -> ModelConfig overrides. "sliding" layers use the superlinear window.
# The hybrids put one superlinear layer after a sliding-window layer, so the
# final query must route itself (no later layer can relay what other
# positions found).
VARIANTS = {
    "dense": dict(attention="dense"),
    "sliding": dict(attention="sliding"),
    "superlinear_k": dict(attention="superlinear", search_key="k"),
    "superlinear_acc": dict(attention="superlinear", search_key="accumulated"),
    "hybrid": dict(layer_pattern=("sliding", "superlinear"), search_key="k"),
    "hybrid_acc": dict(layer_pattern=("sliding", "superlinear"), search_key="accumulated",
                       search_rope=False),
    "hybrid_acc_rope": dict(layer_pattern=("sliding", "superlinear"),
                            search_key="accumulated", search_rope=True),
    "ppa": dict(attention="ppa"),
}


def model_config(variant: str, task, *, superlinear=None, **overrides):
  """The small `ModelConfig` of a variant: 2 layers, d_model 64, 2 heads of 32.

  `superlinear`: an `attn.SuperlinearConfig` (default: `SUPERLINEAR_KW`);
  `window` defaults to its window.
  """
  from attn import SuperlinearConfig
  from train.model import ModelConfig

  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
  sl = superlinear if superlinear is not None else SuperlinearConfig(**SUPERLINEAR_KW)
  kw = dict(vocab_size=task.vocab_size, d_model=64, num_layers=2, num_heads=2,
            num_kv_heads=2, head_dim=32, mlp_dim=256, superlinear=sl,
            window=sl.window)
  kw.update(VARIANTS[variant])
  kw.update(overrides)
  return ModelConfig(**kw)


# ----------------------------------------------------------------------------
# Training


def _eprint(*args):
  print(*args, file=sys.stderr, flush=True)


def _fmt_s(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def train_model(config, task, *, steps: int, batch_size: int = 32,
                seq_len: int = 128, lr: float = 3e-3, weight_decay: float = 0.01,
                seed: int = 0, log_every: int = 25, lm_weight: float = 0.0,
                warm_steps: int = 0, warm_len: int = 0, warm_batch: int = 0,
                progress=None):
  """Train a fresh `Transformer(config)` on a NIAH task.

  AdamW (linear warmup over the first 10% of steps, max 20, then cosine decay
  to 0.1 lr), global-norm clipping at 1, one jitted NNX train step
  (split/merge, donated state). Loss: cross entropy of the answer at the last
  position, plus `lm_weight` times the mean next-byte cross entropy over the
  positions whose target is a text byte (`TextNeedleTask` only).

  Args:
    config: a `train.model.ModelConfig` (vocab_size >= task.vocab_size).
    task: `PasskeyTask` or `TextNeedleTask` (training split haystacks).
    steps, batch_size, seq_len, lr, weight_decay, seed: as named; the
      model is initialised with `nnx.Rngs(seed)` and data drawn from
      `np.random.default_rng([seed, 1])`.
    log_every: record (step, loss, acc) every this many steps.
    lm_weight: weight of the language-modelling loss on the text.
    warm_steps, warm_len, warm_batch: a length curriculum: the first
      `warm_steps` steps (of `steps`) use sequences of `warm_len` tokens in
      batches of `warm_batch`; the rest use `seq_len` and `batch_size`.
    progress: optional `callback(step, loss, acc)` called at each record.

  Returns:
    `(model, history)`: the trained `Transformer` and a list of
    `[step, answer_loss, train_accuracy]` (float) records.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from train.model import Transformer

  if config.vocab_size < task.vocab_size:
    raise ValueError("config.vocab_size is smaller than the task vocabulary")
  if lm_weight and not isinstance(task, TextNeedleTask):
    raise ValueError("lm_weight > 0 needs a TextNeedleTask (text to model)")
  model = Transformer(config, rngs=nnx.Rngs(seed))
  warmup = max(1, min(20, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
      end_value=0.1 * lr)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=weight_decay))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state, tokens, targets):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      all_logits = model(tokens)                                  # [b, L, vocab]
      logits = all_logits[:, -1]
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
      acc = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
      total = loss
      if lm_weight:
        nxt = tokens[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(all_logits[:, :-1], nxt)
        is_text = (nxt < 256).astype(jnp.float32)
        total = loss + lm_weight * jnp.sum(ce * is_text) / jnp.maximum(jnp.sum(is_text), 1)
      return total, (loss, acc)

    (_, (loss, acc)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss, acc

  rng = np.random.default_rng([seed, 1])
  history = []
  losses, accs = [], []
  if warm_steps and not (0 < warm_steps < steps and warm_len >= 8 and warm_batch >= 1):
    raise ValueError(f"warm_steps={warm_steps}, warm_len={warm_len}, warm_batch={warm_batch}: "
                     "need 0 < warm_steps < steps, warm_len >= 8 and warm_batch >= 1")
  for step in range(1, steps + 1):
    warm = step <= warm_steps
    b = task.batch(rng, warm_batch if warm else batch_size, warm_len if warm else seq_len,
                   split="train")
    state, loss, acc = step_fn(state, jnp.asarray(b.tokens), jnp.asarray(b.targets))
    losses.append(loss)
    accs.append(acc)
    if step % log_every == 0 or step == steps:
      loss_v = float(np.mean(jax.device_get(losses)))
      acc_v = float(np.mean(jax.device_get(accs)))
      if not math.isfinite(loss_v):
        raise FloatingPointError(f"non-finite loss {loss_v} at step {step}")
      history.append([step, loss_v, acc_v])
      losses, accs = [], []
      if progress is not None:
        progress(step, loss_v, acc_v)
  model, _ = nnx.merge(graphdef, state)
  return model, history


# ----------------------------------------------------------------------------
# Evaluation


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


def span_hits(q_pos, anchors, value_pos, seq_len: int, config) -> np.ndarray:
  """Does a selected span contain the needle's VALUE?

  Args:
    q_pos: int `[n]`, absolute positions of the queries.
    anchors: int `[batch, n, heads, K]` selected anchors (`< 0` = none).
    value_pos: int `[batch]`, the VALUE position.
    seq_len: the sequence length (span tables).
    config: the `attn.SuperlinearConfig`.

  Returns:
    bool `[batch, n, heads, K]`: span `k` of head `h` of query `i` contains it.
  """
  from attn import masks

  q = np.asarray(q_pos, np.int64)[None, :, None, None]
  start, end = masks.superlinear_spans(q, np.asarray(anchors, np.int64), seq_len, config)
  vp = np.asarray(value_pos)[:, None, None, None]
  return (start <= vp) & (vp <= end)


def random_anchors(rng, q_pos, heads: int, seq_len: int, config) -> np.ndarray:
  """int `[n, heads, K]`: `K = num_spans` valid stripe anchors per head and query,
  drawn uniformly without replacement (`-1` where fewer are valid)."""
  from attn import masks

  table = masks.superlinear_stripe_table(seq_len, config)
  out = np.full((len(q_pos), heads, config.num_spans), -1, np.int64)
  for i, q in enumerate(q_pos):
    valid = q + 1 - table
    valid = valid[valid >= 0]
    k = min(config.num_spans, len(valid))
    for h in range(heads):
      out[i, h, :k] = rng.choice(valid, k, replace=False)
  return out


def needle_anchor_hits(model, task, *, lengths, samples: int = 64,
                       seed: int = 4321, distractors: int = 0) -> dict:
  """How often the selected superlinear spans contain the needle.

  For each superlinear layer, the layer's input is recomputed with the
  model's own blocks, the attention query, key, routing query and search key
  come from the layer's own `train.model.Attention.project`, and
  `attn.superlinear_attention_with_anchors` gives the anchors of the last `W`
  positions (the final query and the rest of its window, `W` = the window).
  A head "hits" when one of its selected anchors' spans `[start, end]`
  (`attn.masks.superlinear_spans`) contains the VALUE position. Needles are
  drawn uniformly over depth from held-out text; those whose VALUE lies
  inside the final query's window are not counted (no span needed).

  Returns a dict: per length (str): `n_outside`, `answer_accuracy`, and per
  layer (`"layer<i>"`), fractions over the needles outside the window:
    `any_head_any_span` (the final query), `any_head_top1`,
    `per_head_any_span` ([heads]), `window_any` (some position of the final
    query's window has such a span), the matching chance rates
    `chance_any_head_any_span`, `chance_window_any` (every head of every
    position picking `num_spans` valid anchors uniformly at random), and
    `correct_given_hit` / `correct_given_miss` (answer accuracy split by
    `any_head_any_span`; None when a group is empty).
  """
  import jax
  import jax.numpy as jnp

  import attn
  config = model.config
  sl = config.superlinear
  window = max(1, sl.window)
  layers = [i for i, kind in enumerate(config.layer_types) if kind == "superlinear"]
  if not layers:
    raise ValueError("the model has no superlinear layer")

  def anchors_of(tokens):
    """tokens [b, L] -> ({layer: anchors [b, n, heads, K]}, preds [b])."""
    seq_len = tokens.shape[1]
    n = min(window, seq_len)
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    x = model._embed(tokens)
    out = {}
    for i, block in enumerate(model.blocks):
      if i in layers:
        xn = block.attn_norm(x)
        q, k, v, q_search, k_search, _ = block.attention.project(xn, positions)
        res = attn.superlinear_attention_with_anchors(
            q[:, -n:], k, v, q_search[:, -n:], k_search, config=sl,
            q_offset=seq_len - n, implementation=config.attn_implementation)
        out[i] = res.anchors                                      # [b, n, h, K]
      x, _ = block(x, positions)
    preds = jnp.argmax(model._logits(x)[:, -1], axis=-1)
    return out, preds

  anchors_fn = jax.jit(anchors_of)
  rng_chance = np.random.default_rng([seed, 3])
  result = {}
  for seq_len in lengths:
    b = task.batch(np.random.default_rng([seed, 4, seq_len]), samples, seq_len,
                   split="heldout", distractors=distractors)
    anchors, preds = anchors_fn(jnp.asarray(b.tokens))
    correct = np.asarray(preds) == b.targets
    n = min(window, seq_len)
    q_pos = np.arange(seq_len - n, seq_len)
    outside = b.value_pos <= (seq_len - 1) - window
    per_len = {"n_outside": int(outside.sum()), "answer_accuracy": float(correct.mean())}
    o = outside

    def frac(x, mask):
      return float(x[mask].mean()) if mask.any() else None

    for i in layers:
      anc = np.asarray(anchors[i])                                # [b, n, h, K]
      inside = span_hits(q_pos, anc, b.value_pos, seq_len, sl)    # [b, n, h, K]
      final = inside[:, -1]                                       # [b, h, K]
      hit = final.any(axis=(-1, -2))
      rand = np.stack([random_anchors(rng_chance, q_pos, anc.shape[2], seq_len, sl)
                       for _ in range(samples)])                  # [b, n, h, K]
      rand_inside = span_hits(q_pos, rand, b.value_pos, seq_len, sl)
      per_len[f"layer{i}"] = {
          "any_head_any_span": frac(hit, o),
          "any_head_top1": frac(final[..., 0].any(axis=-1), o),
          "per_head_any_span": [frac(final[:, h].any(axis=-1), o)
                                for h in range(anc.shape[2])],
          "window_any": frac(inside.any(axis=(1, 2, 3)), o),
          "chance_any_head_any_span": frac(rand_inside[:, -1].any(axis=(-1, -2)), o),
          "chance_window_any": frac(rand_inside.any(axis=(1, 2, 3)), o),
          "correct_given_hit": frac(correct, o & hit),
          "correct_given_miss": frac(correct, o & ~hit),
      }
    result[str(seq_len)] = per_len
  return result


# ----------------------------------------------------------------------------
# Plots and report


def plot_heatmap(grid, lengths, depths, path, *, title: str):
  """Kamradt-style heatmap: depth % on y (0 at top), length on x, accuracy colour."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LinearSegmentedColormap

  grid = np.asarray(grid, dtype=np.float64)
  cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
  fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.2, 0.36 * len(depths) + 1.6))
  im = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
  for (r, c), value in np.ndenumerate(grid):
    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth (%)")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_grid(grid, lengths, depths) -> str:
  """The depth x length grid as aligned text (rows: depth %, columns: length)."""
  grid = np.asarray(grid)
  head = "depth% " + "".join(f"{n:>7d}" for n in lengths)
  rows = [f"{100 * d:5.0f}  " + "".join(f"{v:7.2f}" for v in grid[i])
          for i, d in enumerate(depths)]
  return "\n".join([head] + rows + ["mean   " + "".join(f"{v:7.2f}" for v in grid.mean(0))])


def _atomic_json(obj, path):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _mean_grid(runs, key="grid"):
  return np.mean([np.asarray(r[key]) for r in runs], axis=0)


def _variant_runs(results):
  by_variant = {}
  for run in results["runs"].values():
    by_variant.setdefault(run["variant"], []).append(run)
  order = [v for v in VARIANTS if v in by_variant]
  return {v: sorted(by_variant[v], key=lambda r: r["seed"]) for v in order}


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.0f}%"


def _task_of(settings):
  t = dict(settings["task"])
  if settings.get("task_kind", "passkey") == "text":
    return TextNeedleTask(**t)
  return PasskeyTask(**t)


def _value_positions(settings, depths, n):
  task = _task_of(settings)
  if isinstance(task, TextNeedleTask):
    return task.marker_positions(np.asarray(depths), n) + 2
  return marker_positions(np.asarray(depths), n) + 1


def beyond_window(settings, grid) -> float:
  """Mean accuracy over the cells whose VALUE lies outside the final query's window."""
  far = []
  for li, n in enumerate(settings["lengths"]):
    value_pos = _value_positions(settings, settings["depths"], n)
    far.extend(np.asarray(grid)[value_pos <= (n - 1) - settings["window"], li].tolist())
  return float(np.mean(far)) if far else float("nan")


def summary(results) -> dict:
  """Per variant: mean accuracy per length (single key, and multi-key if run),
  beyond-window accuracy, train seconds, span-hit rows."""
  s = results["settings"]
  out = {}
  for v, runs in _variant_runs(results).items():
    g = _mean_grid(runs)
    entry = {"per_length": g.mean(axis=0).tolist(), "beyond_window": beyond_window(s, g),
             "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
             "seeds": [r["seed"] for r in runs]}
    if all("grid_multi" in r for r in runs):
      entry["multi_per_length"] = _mean_grid(runs, "grid_multi").mean(axis=0).tolist()
    out[v] = entry
  return out


def targets(results) -> list[str]:
  """The routing targets, each stated as met / missed / not measured."""
  s = results["settings"]
  summ = summary(results)
  lengths = s["lengths"]
  if s["train_len"] not in lengths:
    return ["- The training length is not on the eval grid: targets not measured."]
  li = lengths.index(s["train_len"])
  chance = 1.0 / s["task"]["num_values"]
  lines = []
  sup = [v for v in summ if v.startswith("hybrid") or v.startswith("superlinear")]
  for v in sup:
    acc = summ[v]["per_length"][li]
    lines.append(f"- `{v}` at the training length (L = {s['train_len']}): accuracy "
                 f"{acc:.2f} (target >= 0.90): **{'met' if acc >= 0.9 else 'missed'}**.")
  if "sliding" in summ:
    acc = summ["sliding"]["per_length"][li]
    lines.append(f"- `sliding` at the training length: {acc:.2f}; beyond its window "
                 f"{summ['sliding']['beyond_window']:.2f} (chance {chance:.3f}).")
  for key, r in results["runs"].items():
    st = (r.get("anchors") or {}).get(str(s["train_len"]))
    if not st:
      continue
    for layer, row in st.items():
      if not layer.startswith("layer") or row["any_head_any_span"] is None:
        continue
      hit, ch = row["any_head_any_span"], row["chance_any_head_any_span"]
      ok = ch is not None and hit >= 2 * ch
      lines.append(f"- `{key}` layer {layer[5:]}: the final query's spans contain the "
                   f"needle {_pct(hit)} of the time against {_pct(ch)} for random "
                   f"anchors (target >= 2x): **{'met' if ok else 'missed'}**.")
  for v in [x for x in summ if x in ("dense",) or x in sup]:
    beyond = [f"{n // s['train_len']}x: {summ[v]['per_length'][i]:.2f}"
              for i, n in enumerate(lengths) if n > s["train_len"]]
    if beyond:
      lines.append(f"- `{v}` beyond the training length: " + ", ".join(beyond) + ".")
  return lines


_READING_OPEN, _READING_CLOSE = "<!-- reading -->", "<!-- /reading -->"
_AUTO_MARK = "(Written automatically from the numbers; replace with a reading.)"


def _auto_reading(results) -> str:
  s = results["settings"]
  lines = [_AUTO_MARK, ""]
  for v, runs in _variant_runs(results).items():
    g = _mean_grid(runs)
    train_len_col = s["lengths"].index(s["train_len"]) if s["train_len"] in s["lengths"] else 0
    lines.append(f"- `{v}`: {g[:, train_len_col].mean():.2f} at the training length, "
                 f"{g.mean():.2f} over the whole grid.")
  return "\n".join(lines)


_TITLES = {
    "passkey": "Passkey needle-in-a-haystack: superlinear routing keys compared",
    "quick": "Needle in a real-text haystack: the quick main job",
    "routing": "Needle in a real-text haystack where the superlinear layer must route",
}


def write_report(results, out: str, name: str = "niah"):
  """Heatmaps `<name>_<variant>.png` and `<name>.md` from the results dict."""
  s = results["settings"]
  preset = s.get("preset", "passkey")
  text_task = s.get("task_kind", "passkey") == "text"
  lengths, depths = s["lengths"], s["depths"]
  variants = _variant_runs(results)
  for v, runs in variants.items():
    g = _mean_grid(runs)
    seeds = ",".join(str(r["seed"]) for r in runs)
    plot_heatmap(g, lengths, depths, os.path.join(out, f"{name}_{v}.png"),
                 title=f"{v}: {'real-text NIAH' if text_task else 'passkey'} accuracy "
                       f"(train L={s['train_len']}, {s['steps']} steps, seeds {seeds})")

  md_path = os.path.join(out, f"{name}.md")
  reading = None
  if os.path.exists(md_path):
    text = open(md_path).read()
    if _READING_OPEN in text and _READING_CLOSE in text:
      reading = text.split(_READING_OPEN, 1)[1].split(_READING_CLOSE, 1)[0].strip()
  if not reading or reading.startswith(_AUTO_MARK):
    reading = _auto_reading(results)

  sl = s["superlinear"]
  cfg = s.get("model", {"d_model": 64, "num_layers": 2})
  L = []
  L.append(f"# {_TITLES.get(preset, _TITLES['passkey'])}\n")
  L.append(f"Generated by `python -m eval.niah {s['command_args']}` "
           f"({results.get('updated', '')}); raw numbers in `{name}.json`.")
  if preset == "passkey":
    L.append("The question: should superlinear layers route with `k` itself "
             "(`search_key=\"k\"`, as the reference) or with an accumulated key "
             "(`search_key=\"accumulated\"`: a gated, decaying causal scan of the "
             "keys, `train.model.gated_linear_scan`)?\n")
  else:
    L.append("The question: does the superlinear layer of a sliding-window + "
             "superlinear hybrid learn to route its final query to a needle far "
             "outside every window, and how does that compare with sliding window "
             "alone and with dense attention?\n")
  L.append("## Setup\n")
  t = s["task"]
  if text_task:
    L.append(f"- Task (`eval.niah.TextNeedleTask`): a window of real text "
             f"(`{t['source']}`: the training split for training, the held-out "
             f"split for evaluation), byte tokens; the needle `MARKER KEY VALUE` "
             f"at depth d (MARKER at `round(d (L - 5))`), a final `QUERY KEY` "
             f"whose next token is the VALUE; {t['num_keys']} keys and "
             f"{t['num_values']} values, special tokens outside the byte range "
             f"(chance {1 / t['num_values']:.3f}). Training draws 0 to "
             f"{t['max_distractors']} distractor needles (other keys, other values) "
             f"per batch; loss only at the answer"
             + (f" plus {s['lm_weight']} x the next-byte loss of the text"
                if s.get("lm_weight") else "") + ". Exact-match accuracy (argmax "
             "over the full vocabulary).")
  else:
    L.append(f"- Task (`eval.niah.PasskeyTask`): {t['num_filler']} filler "
             f"tokens drawn i.i.d., the needle `MARKER VALUE` at depth d "
             f"(marker at `round(d (L - 3))`), a final `QUERY` whose next token "
             f"is the VALUE; {t['num_values']} values never used in the "
             f"haystack (chance {1 / t['num_values']:.3f}); loss only at "
             "the QUERY position; exact-match accuracy (argmax over the full "
             "vocabulary).")
  L.append(f"- Model: {cfg['num_layers']} layers, d_model {cfg['d_model']}, 2 heads of "
           f"{cfg['d_model'] // 2}, SwiGLU {4 * cfg['d_model']}, RoPE. Variants: "
           + "; ".join(f"`{v}` = {', '.join(f'{k}={x}' for k, x in VARIANTS[v].items())}"
                       for v in variants) + ".")
  warm = s.get("warm") or {}
  curriculum = (f" after {warm['steps']} steps at L = {warm['len']}, batch {warm['batch']} "
                "(a length curriculum)" if warm.get("steps") else "")
  L.append(f"- Training: {s['steps']} steps, batch {s['batch_size']}, "
           f"L = {s['train_len']}{curriculum} (needle depth uniform), AdamW lr {s['lr']} "
           "(warmup, cosine to 0.1x), weight decay 0.01, clip 1.0; "
           f"seeds {s['seeds']}.")
  L.append(f"- Superlinear: `SuperlinearConfig({', '.join(f'{k}={v}' for k, v in sl.items())})`"
           f", i.e. a {s['window']}-key window; `sliding` layers use the same "
           f"{s['window']}-key window; `dense` is full causal attention.")
  if s.get("coverage"):
    c = s["coverage"]
    L.append(f"- At L = {s['train_len']} the final query's window and "
             f"{sl.get('num_spans', 2)} spans cover at most {c['keys']} of "
             f"{s['train_len']} keys ({100 * c['fraction']:.1f}%).")
  L.append(f"- Eval: lengths {lengths} x depths "
           f"{[round(100 * d) for d in depths]}%, {s['samples']} sequences per "
           "cell, the same eval set for every model"
           + (f" (held-out text)" if text_task else "") + ". Lengths above the "
           "training length test length generalisation.\n")

  L.append("## Accuracy per variant and length\n")
  L.append("Mean over depths (and over seeds; per-seed values in brackets). "
           "`beyond window` averages the cells whose needle lies outside the "
           f"final query's {s['window']}-key window.\n")
  head = "| variant | train s | " + " | ".join(f"L={n}" for n in lengths) + " | beyond window |"
  L.append(head)
  L.append("|" + "---|" * (len(lengths) + 3))
  for v, runs in variants.items():
    cells = []
    for li in range(len(lengths)):
      per_seed = [float(np.mean(np.asarray(r["grid"])[:, li])) for r in runs]
      extra = f" ({', '.join(f'{x:.2f}' for x in per_seed)})" if len(runs) > 1 else ""
      cells.append(f"{np.mean(per_seed):.2f}{extra}")
    g = _mean_grid(runs)
    secs = np.mean([r["train_seconds"] for r in runs])
    L.append(f"| `{v}` | {secs:.0f} | " + " | ".join(cells) +
             f" | {beyond_window(s, g):.2f} |")
  L.append("")
  if any("grid_multi" in r for rs in variants.values() for r in rs):
    nd = s.get("eval_distractors", 0)
    L.append(f"Multi-key (RULER style): {nd} distractor needles with other keys and "
             "values in every sequence; mean accuracy over depths.\n")
    L.append("| variant | " + " | ".join(f"L={n}" for n in lengths) + " |")
    L.append("|" + "---|" * (len(lengths) + 1))
    for v, runs in variants.items():
      if all("grid_multi" in r for r in runs):
        m = _mean_grid(runs, "grid_multi").mean(axis=0)
        L.append(f"| `{v}` | " + " | ".join(f"{x:.2f}" for x in m) + " |")
    L.append("")
  L.append("Final training loss / accuracy (last logging window): " + "; ".join(
      f"`{v}` " + ", ".join(f"{r['history'][-1][1]:.3f} / {r['history'][-1][2]:.2f}"
                            for r in runs) for v, runs in variants.items()) + ".\n")
  if preset == "routing":
    L.append("## Targets\n")
    L.extend(targets(results))
    L.append("")

  L.append("## Heatmaps\n")
  for v in variants:
    L.append(f"![{v}]({name}_{v}.png)\n")

  anchor_runs = [(k, r) for k, r in results["runs"].items() if r.get("anchors")]
  has_window = any("window_any" in st for _, r in anchor_runs for per_len in r["anchors"].values()
                   for st in per_len.values() if isinstance(st, dict))
  if anchor_runs:
    L.append("## Do the selected spans contain the needle?\n")
    L.append("For each trained superlinear model: the selected anchors "
             "(`attn.superlinear_attention_with_anchors` on each superlinear "
             "layer's input, recomputed from the trained weights), over "
             f"{s['anchor_samples']} needles per length uniform in depth; counted "
             "over the needles outside the final query's window. `hit` = some "
             "head of the final query has a selected span containing the VALUE "
             "position; `top-1` = the best anchor's span does; "
             + ("`window hit` = some position of the final query's window does; "
                if has_window else "")
             + "`chance`: the same rate if every head picked its spans uniformly "
             "among the valid anchors; answer accuracy split by `hit`.\n")
    L.append("| run | L | layer | outside | hit | top-1 | chance | "
             + ("window hit | window chance | " if has_window else "")
             + "acc if hit | acc if miss |")
    L.append("|" + "---|" * (11 if has_window else 9))
    for key, r in anchor_runs:
      for n, per_len in r["anchors"].items():
        for layer, st in per_len.items():
          if not layer.startswith("layer"):
            continue
          L.append(f"| `{key}` | {n} | {layer[5:]} | {per_len['n_outside']} | "
                   f"{_pct(st['any_head_any_span'])} | {_pct(st['any_head_top1'])} | "
                   f"{_pct(st['chance_any_head_any_span'])} | "
                   + (f"{_pct(st.get('window_any'))} | {_pct(st.get('chance_window_any'))} | "
                      if has_window else "") +
                   f"{_pct(st['correct_given_hit'])} | {_pct(st['correct_given_miss'])} |")
    L.append("")

  L.append("## Reading\n")
  L.append(_READING_OPEN)
  L.append(reading)
  L.append(_READING_CLOSE)
  L.append("")
  with open(md_path, "w") as f:
    f.write("\n".join(L))


# ----------------------------------------------------------------------------
# Command line

# Each preset fills the flags the command line leaves unset.
PRESETS = {
    "passkey": dict(
        task_kind="passkey", task={}, name="niah",
        variants=["superlinear_k", "superlinear_acc", "dense", "sliding"], seeds=[0, 1],
        steps=300, train_len=128, batch_size=32, lr=3e-3, lengths=[128, 256, 512, 1024],
        depths=11, samples=32, anchor_samples=64, superlinear=SUPERLINEAR_KW,
        eval_distractors=0, lm_weight=0.0, d_model=64, warm_steps=0, warm_len=0,
        warm_batch=0),
    "quick": dict(
        task_kind="text", task=dict(num_keys=16, num_values=16, max_distractors=0),
        name="niah", variants=["hybrid_acc", "sliding"], seeds=[0], steps=300, train_len=256,
        batch_size=32, lr=3e-3, lengths=[256, 512, 1024], depths=6, samples=16,
        anchor_samples=32, superlinear=SUPERLINEAR_KW, eval_distractors=0,
        lm_weight=0.0, d_model=64, warm_steps=0, warm_len=0, warm_batch=0),
    "routing": dict(
        task_kind="text", task=dict(num_keys=16, num_values=16, max_distractors=2),
        name="niah_routing", variants=["hybrid_acc", "hybrid_acc_rope", "hybrid", "sliding",
                                       "dense"], seeds=[0],
        steps=500, train_len=1024, batch_size=16, lr=3e-3, lengths=[1024, 2048, 4096],
        depths=6, samples=16, anchor_samples=48, superlinear={}, eval_distractors=3,
        lm_weight=0.0, d_model=64, warm_steps=250, warm_len=256, warm_batch=32),
}


def _parse(argv):
  ap = argparse.ArgumentParser(prog="python -m eval.niah", description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=list(PRESETS), default="passkey",
                  help="defaults for every flag below (quick = the README's main job)")
  ap.add_argument("--out", default=None, help="output directory (default docs, runs/ for quick)")
  ap.add_argument("--name", default=None, help="file name prefix of the outputs")
  ap.add_argument("--steps", type=int)
  ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
  ap.add_argument("--seeds", nargs="+", type=int)
  ap.add_argument("--lengths", nargs="+", type=int)
  ap.add_argument("--depths", type=int, help="number of depths, evenly spaced over 0..100%%")
  ap.add_argument("--samples", type=int, help="eval sequences per cell")
  ap.add_argument("--train-len", type=int)
  ap.add_argument("--batch-size", type=int)
  ap.add_argument("--lr", type=float)
  ap.add_argument("--d-model", type=int, help="model width (heads of d_model / 2)")
  ap.add_argument("--anchor-samples", type=int,
                  help="needles per length for the span analysis (0 = skip)")
  ap.add_argument("--warm-steps", type=int,
                  help="length curriculum: the first N steps at --warm-len (0 = none)")
  ap.add_argument("--warm-len", type=int)
  ap.add_argument("--warm-batch", type=int)
  ap.add_argument("--eval-distractors", type=int,
                  help="distractor needles of the multi-key eval grid (0 = skip it)")
  ap.add_argument("--fresh", action="store_true",
                  help="ignore an existing <name>.json instead of resuming it")
  ap.add_argument("--report-only", action="store_true",
                  help="only rewrite <name>.md and the heatmaps from <name>.json")
  args = ap.parse_args(argv)
  preset = PRESETS[args.preset]
  for key, value in preset.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.out is None:
    args.out = "runs/niah_quick" if args.preset == "quick" else "docs"
  return args


class _Bar:
  """Progress bar with ETA over all the runs of the command (stderr)."""

  def __init__(self, total_steps: int):
    self.total, self.done, self.t0 = total_steps, 0, time.time()
    self.tty = sys.stderr.isatty()

  def show(self, done: int, text: str, final: bool = False):
    self.done = done
    frac = min(1.0, done / max(1, self.total))
    elapsed = time.time() - self.t0
    eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    line = (f"[{bar}] {100 * frac:5.1f}% | {text} | elapsed {_fmt_s(elapsed)} "
            f"ETA {_fmt_s(eta) if math.isfinite(eta) else '--'}")
    if self.tty:
      sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
      sys.stderr.flush()
    else:
      _eprint(line)


def coverage(seq_len: int, superlinear_kw: dict) -> dict:
  """Keys the final query of a `seq_len` sequence can reach at most: its
  window plus `num_spans` of its longest candidate spans."""
  from attn import SuperlinearConfig, masks

  sl = SuperlinearConfig(**superlinear_kw)
  q = seq_len - 1
  anchors = q + 1 - masks.superlinear_stripe_table(seq_len, sl)
  anchors = anchors[anchors >= 0]
  start, end = masks.superlinear_spans(np.int64(q), anchors, seq_len, sl)
  lengths = np.sort(np.maximum(end - start + 1, 0))[::-1]
  keys = int(min(seq_len, sl.window + lengths[:sl.num_spans].sum()))
  return {"keys": keys, "fraction": keys / seq_len}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  from attn import SuperlinearConfig

  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, f"{args.name}.json")
  text_task = args.task_kind == "text"
  task = TextNeedleTask(**args.task) if text_task else PasskeyTask(**args.task)
  depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
  sl = SuperlinearConfig(**args.superlinear)
  settings = dict(
      preset=args.preset, task_kind=args.task_kind,
      steps=args.steps, seeds=args.seeds, lengths=args.lengths, depths=depths,
      samples=args.samples, train_len=args.train_len, batch_size=args.batch_size,
      lr=args.lr, anchor_samples=args.anchor_samples, task=dataclasses.asdict(task),
      superlinear=dataclasses.asdict(sl), window=sl.window,
      eval_distractors=args.eval_distractors if text_task else 0,
      lm_weight=args.lm_weight, model={"d_model": args.d_model, "num_layers": 2},
      warm=dict(steps=args.warm_steps, len=args.warm_len, batch=args.warm_batch),
      coverage=coverage(args.train_len, dataclasses.asdict(sl)),
      command_args=" ".join(argv))

  fixed = ("steps", "lengths", "depths", "samples", "train_len", "batch_size", "lr",
           "task", "superlinear", "eval_distractors", "lm_weight", "model", "warm")
  results = None
  if os.path.exists(json_path) and not args.fresh:
    with open(json_path) as f:
      results = json.load(f)
    old = results["settings"]
    if args.report_only:
      pass
    elif {k: old.get(k) for k in fixed} != {k: settings[k] for k in fixed}:
      raise SystemExit(f"{json_path} holds results for other settings; pass --fresh "
                       "to overwrite it or --out elsewhere.")
    else:
      results["settings"]["seeds"] = sorted(set(old["seeds"]) | set(args.seeds))
      results["settings"]["command_args"] = settings["command_args"]
  if args.report_only:
    if results is None:
      raise SystemExit(f"no {json_path} to report from")
    write_report(results, args.out, args.name)
    _refresh_results(args.out)
    return
  if results is None:
    results = {"settings": settings, "runs": {}}

  plan = [(v, s) for s in args.seeds for v in args.variants
          if f"{v}/seed{s}" not in results["runs"]]
  _eprint(f"[niah] {len(plan)} runs to do ({len(results['runs'])} already in {json_path})")
  # Eval and span analysis cost about as much as 20% of training: count them in.
  bar = _Bar(int(len(plan) * args.steps * 1.2))
  t_start = time.time()
  for n_done, (variant, seed) in enumerate(plan):
    key = f"{variant}/seed{seed}"
    config = model_config(variant, task, superlinear=sl, d_model=args.d_model,
                          num_heads=2, num_kv_heads=2, head_dim=args.d_model // 2,
                          mlp_dim=4 * args.d_model)
    t0 = time.time()
    base = int(n_done * args.steps * 1.2)

    def progress(step, loss, acc, key=key, base=base):
      bar.show(base + step, f"{key} step {step}/{args.steps} loss {loss:.3f} acc {acc:.2f}")

    model, history = train_model(config, task, steps=args.steps,
                                 batch_size=args.batch_size, seq_len=args.train_len,
                                 lr=args.lr, seed=seed, lm_weight=args.lm_weight,
                                 warm_steps=args.warm_steps, warm_len=args.warm_len,
                                 warm_batch=args.warm_batch,
                                 log_every=max(1, min(25, args.steps // 20)),
                                 progress=progress)
    t_train = time.time() - t0
    bar.show(base + args.steps, f"{key} trained in {_fmt_s(t_train)}; evaluating")
    grid = evaluate_grid(model, task, lengths=args.lengths, depths=depths,
                         samples=args.samples)
    run = dict(variant=variant, seed=seed, steps=args.steps,
               train_seconds=t_train, history=history, grid=grid.tolist(),
               mean_per_length=grid.mean(axis=0).tolist())
    if text_task and args.eval_distractors:
      multi = evaluate_grid(model, task, lengths=args.lengths, depths=depths,
                            samples=args.samples, distractors=args.eval_distractors)
      run["grid_multi"] = multi.tolist()
    if "superlinear" in config.layer_types and args.anchor_samples > 0:
      run["anchors"] = needle_anchor_hits(model, task, lengths=args.lengths,
                                          samples=args.anchor_samples)
    run["eval_seconds"] = time.time() - t0 - t_train
    results["runs"][key] = run
    results["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
    _atomic_json(results, json_path)
    write_report(results, args.out, args.name)
    _refresh_results(args.out)
    bar.show(int((n_done + 1) * args.steps * 1.2), f"{key} done", final=True)
    _eprint(f"[niah] {key}: accuracy (rows: needle depth %, columns: length)\n"
            + format_grid(grid, args.lengths, depths))
  summ = summary(results)
  _eprint(f"[niah] all done in {_fmt_s(time.time() - t_start)}; mean accuracy per length "
          f"(chance {1 / task.num_values:.3f}):")
  _eprint("  variant          " + "".join(f"{f'L={n}':>9}" for n in args.lengths)
          + "  beyond window")
  for v, e in summ.items():
    _eprint(f"  {v:<16} " + "".join(f"{x:9.2f}" for x in e["per_length"])
            + f"  {e['beyond_window']:.2f}")
  if args.preset == "routing":
    _eprint("\n".join(targets(results)))
  _eprint(f"[niah] report: {os.path.join(args.out, args.name + '.md')}, heatmaps "
          f"{os.path.join(args.out, args.name + '_<variant>.png')}")
  _refresh_results(args.out)


def _refresh_results(out: str):
  from eval import results as results_lib
  results_lib.update(out)


if __name__ == "__main__":
  main()
