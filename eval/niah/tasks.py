"""NIAH tasks: sequence generators (pure numpy).

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

import dataclasses
from typing import NamedTuple

import numpy as np

__all__ = ["NiahBatch", "PasskeyTask", "TextNeedleTask", "make_batch", "marker_positions"]


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
