"""Byte-level language-modelling data: the Python standard library's sources.

The corpus is real text that needs no download and no new dependency: every
`*.py` file under `sysconfig.get_paths()["stdlib"]` (site-/dist-packages
excluded), sorted by relative path, concatenated with a NUL byte between
files, read as bytes (vocabulary 256, so the loss in nats / ln 2 is bits per
byte). The sources are under the PSF licence. The exact bytes depend on the
Python patch release (3.12.x), so compare runs on the same interpreter.
`max_bytes` stops reading early: the first N bytes of that stream.

The stream is cut into non-overlapping windows of `seq_len + 1` bytes (inputs
are `[:-1]`, targets `[1:]`); a grain `MapDataset` shuffles the windows
(reshuffled each epoch, seeded), repeats forever, takes this process's shard
(`grain.sharding.ShardByJaxProcess`: element `i` of the shuffled stream goes to
process `i % process_count`), and batches. The iterator's state
(`get_state()` / `set_state()`) is saved with every checkpoint, so a resumed run
reads exactly the batches an uninterrupted one would have.

Each batch is a dict: `tokens` int32 [local_batch, seq_len + 1] and `index`
int64 [local_batch], the window's position in the corpus (for tracing).
"""

from __future__ import annotations

import functools
import os
import sysconfig

import grain
import numpy as np

from train.config import Config

SEPARATOR = b"\x00"


def stdlib_files() -> list[str]:
  """Sorted absolute paths of the standard library's `*.py` files."""
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    for name in filenames:
      if name.endswith(".py"):
        found.append(os.path.join(dirpath, name))
  return sorted(found, key=lambda p: os.path.relpath(p, root))


@functools.lru_cache(maxsize=4)
def load_stdlib_bytes(max_bytes: int = 0) -> np.ndarray:
  """The corpus as uint8, at most `max_bytes` bytes (0 = all)."""
  chunks, total = [], 0
  for path in stdlib_files():
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(data + SEPARATOR)
    total += len(data) + 1
    if max_bytes and total >= max_bytes:
      break
  buf = b"".join(chunks)
  if max_bytes:
    buf = buf[:max_bytes]
  arr = np.frombuffer(buf, dtype=np.uint8)
  arr.setflags(write=False)
  return arr


def synthetic_bytes(num_bytes: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=num_bytes, dtype=np.uint8)


class WindowSource:
  """Random access to non-overlapping `length`-byte windows of a byte array."""

  def __init__(self, data: np.ndarray, length: int):
    if len(data) < length:
      raise ValueError(f"corpus has {len(data)} bytes, fewer than one window of {length}: "
                       "raise data.max_bytes")
    self._data = data
    self._length = length

  def __len__(self) -> int:
    return len(self._data) // self._length

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    start = i * self._length
    return {"tokens": self._data[start:start + self._length].astype(np.int32),
            "index": np.int64(i)}


def corpus(config: Config) -> np.ndarray:
  if config.data.source == "stdlib":
    return load_stdlib_bytes(config.data.max_bytes)
  if config.data.source == "synthetic":
    return synthetic_bytes(config.data.max_bytes or 1 << 20, config.seed)
  raise ValueError(f"data.source={config.data.source!r}: expected 'stdlib' or 'synthetic'")


def make_dataset(config: Config, *, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
  """The (infinite) batched dataset of this process's shard."""
  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    shard_index, shard_count = shard.shard_index, shard.shard_count
  if config.batch_size % shard_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                     f"number of processes ({shard_count})")
  ds = grain.MapDataset.source(WindowSource(corpus(config), config.seq_len + 1))
  if config.data.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(None)  # shuffle then repeat: a fresh permutation every epoch
  ds = ds[shard_index::shard_count]
  return ds.batch(config.batch_size // shard_count, drop_remainder=True)


def make_iterator(config: Config, **shard) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state` / `set_state`) over batches."""
  ds = make_dataset(config, **shard)
  read = grain.ReadOptions(num_threads=config.data.num_threads,
                           prefetch_buffer_size=config.data.prefetch)
  return iter(ds.to_iter_dataset(read))
