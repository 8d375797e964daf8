"""The grain pipeline over the stdlib sources: determinism, sharding, state."""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import numpy as np
import pytest

from train import data as data_lib
from train.config import Config, DataConfig

MAX_BYTES = 50_000


def make_config(**kw) -> Config:
  base = dict(batch_size=4, seq_len=15, seed=3, data=DataConfig(max_bytes=MAX_BYTES,
                                                                num_threads=1, prefetch=2))
  base.update(kw)
  return Config(**base)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_corpus_is_sorted_stdlib_python_source():
  files = data_lib.stdlib_files()
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  rel = [os.path.relpath(p, root) for p in files]
  assert len(files) > 500 and rel == sorted(rel)
  assert all(p.endswith(".py") and "site-packages" not in p for p in files)
  assert "os.py" in rel and "json/__init__.py" in rel
  small = data_lib.load_stdlib_bytes(1000)
  big = data_lib.load_stdlib_bytes(MAX_BYTES)
  assert small.dtype == np.uint8 and len(small) == 1000 and len(big) == MAX_BYTES
  np.testing.assert_array_equal(small, big[:1000])
  with open(files[0], "rb") as f:
    first = f.read()
  assert bytes(big[:len(first)]) == first and big[len(first)] == 0  # NUL separator


def test_windows_are_corpus_slices():
  cfg = make_config()
  corpus = data_lib.corpus(cfg)
  batch = next(data_lib.make_iterator(cfg))
  assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
  for row, i in zip(batch["tokens"], batch["index"]):
    np.testing.assert_array_equal(row, corpus[i * 16:(i + 1) * 16])


def test_deterministic_and_seeded():
  a = take(data_lib.make_iterator(make_config()), 5)
  b = take(data_lib.make_iterator(make_config()), 5)
  c = take(data_lib.make_iterator(make_config(seed=4)), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  assert any(not np.array_equal(x["index"], z["index"]) for x, z in zip(a, c))


def test_each_epoch_visits_every_window_once_and_reshuffles():
  cfg = make_config(data=DataConfig(max_bytes=16 * 40, num_threads=0), batch_size=8)
  n = len(data_lib.WindowSource(data_lib.corpus(cfg), 16))
  assert n == 40
  it = data_lib.make_iterator(cfg)
  idx = np.concatenate([b["index"] for b in take(it, 10)])  # 80 = 2 epochs
  np.testing.assert_array_equal(np.sort(idx[:40]), np.arange(40))
  np.testing.assert_array_equal(np.sort(idx[40:]), np.arange(40))
  assert not np.array_equal(idx[:40], idx[40:])


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  cfg = make_config(batch_size=8)
  single = take(data_lib.make_iterator(cfg, shard_index=0, shard_count=1), 6)
  s0 = take(data_lib.make_iterator(cfg, shard_index=0, shard_count=2), 6)
  s1 = take(data_lib.make_iterator(cfg, shard_index=1, shard_count=2), 6)
  for g, a, b in zip(single, s0, s1):
    assert a["tokens"].shape == (4, 16)
    assert not set(a["index"]) & set(b["index"])
    assert sorted(np.concatenate([a["index"], b["index"]])) == sorted(g["index"])
  with pytest.raises(ValueError, match="not divisible"):
    data_lib.make_dataset(make_config(batch_size=5), shard_index=0, shard_count=2)


def test_iterator_state_resumes_exactly():
  cfg = make_config()
  it = data_lib.make_iterator(cfg)
  take(it, 7)
  state = it.get_state()
  expected = take(it, 5)
  it2 = data_lib.make_iterator(cfg)
  it2.set_state(state)
  for x, y in zip(expected, take(it2, 5)):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_too_small_corpus_is_an_error():
  with pytest.raises(ValueError, match="max_bytes"):
    data_lib.make_iterator(make_config(seq_len=99, data=DataConfig(max_bytes=50)))
