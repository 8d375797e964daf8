"""Tests of eval.niah: the passkey generator, and a train/eval smoke test."""

import numpy as np
import pytest

from eval import niah

TASK = niah.PasskeyTask(num_filler=10, num_values=6)


def _batch(seed=0, batch=64, seq_len=40, depths=None):
  return niah.make_batch(np.random.default_rng(seed), TASK, batch, seq_len, depths)


def test_layout_and_answer_is_needle_value():
  b = _batch()
  assert b.tokens.shape == (64, 40) and b.tokens.dtype == np.int32
  assert b.targets.shape == b.marker_pos.shape == b.depths.shape == (64,)
  rows = np.arange(64)
  assert np.all(b.tokens[rows, b.marker_pos] == TASK.MARKER)
  # The answer is the token right after the marker, a value token.
  assert np.array_equal(b.tokens[rows, b.marker_pos + 1], b.targets)
  assert np.all(np.isin(b.targets, TASK.value_ids))
  assert np.all(b.tokens[:, -1] == TASK.QUERY)
  assert np.all((b.tokens < TASK.vocab_size) & (b.tokens != TASK.PAD))


def test_values_and_specials_never_in_haystack():
  b = _batch(seq_len=64, batch=128)
  haystack = b.tokens.copy()
  rows = np.arange(len(haystack))
  haystack[rows, b.marker_pos] = -1
  haystack[rows, b.marker_pos + 1] = -1
  haystack[:, -1] = -1
  rest = haystack[haystack >= 0]
  assert np.all(np.isin(rest, TASK.filler_ids))
  assert not np.any(np.isin(rest, TASK.value_ids))
  # Exactly one marker, one value token and one query per sequence.
  assert np.all((b.tokens == TASK.MARKER).sum(1) == 1)
  assert np.all((b.tokens == TASK.QUERY).sum(1) == 1)
  assert np.all(np.isin(b.tokens, TASK.value_ids).sum(1) == 1)
  assert len(set(TASK.filler_ids) & set(TASK.value_ids)) == 0


@pytest.mark.parametrize("seq_len", [4, 10, 128, 1024])
def test_depth_placement(seq_len):
  depths = np.array([0.0, 0.25, 0.5, 1.0])
  pos = niah.marker_positions(depths, seq_len)
  assert pos[0] == 0                                   # first token
  assert pos[-1] == seq_len - 3                        # value just before QUERY
  assert np.all(np.diff(pos) >= 0)
  np.testing.assert_allclose(pos, depths * (seq_len - 3), atol=0.5)
  for d, p in zip(depths, pos):
    b = _batch(batch=8, seq_len=seq_len, depths=d)
    assert np.all(b.marker_pos == p)
    assert np.all(b.tokens[:, p] == TASK.MARKER)
    assert np.all(b.tokens[:, p + 1] == b.targets)
  # Random depths cover the whole admissible range [0, L - 3].
  b = _batch(batch=4000, seq_len=10)
  assert set(b.marker_pos.tolist()) == set(range(8))
  with pytest.raises(ValueError):
    niah.marker_positions([1.5], seq_len)


def test_deterministic_per_seed():
  a, b, c = _batch(seed=7), _batch(seed=7), _batch(seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.tokens, c.tokens)
  with pytest.raises(TypeError):
    niah.make_batch(7, TASK, 2, 16)
  with pytest.raises(ValueError):
    niah.make_batch(np.random.default_rng(0), TASK, 2, 3)


def test_variant_configs():
  for v in niah.VARIANTS:
    cfg = niah.model_config(v, niah.PasskeyTask())
    assert cfg.vocab_size == niah.PasskeyTask().vocab_size
    assert cfg.window == cfg.superlinear.window == 15
  assert niah.model_config("superlinear_acc", TASK).search_key == "accumulated"
  assert niah.model_config("superlinear_k", TASK).search_key == "k"


def test_train_and_eval_smoke(tmp_path):
  cfg = niah.model_config("superlinear_acc", TASK, d_model=16, num_heads=1,
                          num_kv_heads=1, head_dim=8, mlp_dim=16, num_layers=1)
  records = []
  model, history = niah.train_model(cfg, TASK, steps=3, batch_size=4, seq_len=24,
                                    log_every=1, progress=lambda *r: records.append(r))
  assert [h[0] for h in history] == [1, 2, 3] and len(records) == 3
  assert all(np.isfinite(h[1]) and 0 <= h[2] <= 1 for h in history)
  lengths, depths = [16, 24], [0.0, 0.5, 1.0]
  grid = niah.evaluate_grid(model, TASK, lengths=lengths, depths=depths, samples=3)
  assert grid.shape == (3, 2)
  assert np.all((grid >= 0) & (grid <= 1))
  # Accuracies are multiples of 1/samples.
  np.testing.assert_allclose(grid * 3, np.round(grid * 3), atol=1e-9)
  hits = niah.needle_anchor_hits(model, TASK, lengths=[24], samples=4)
  st = hits["24"]["layer0"]
  assert 0 <= hits["24"]["n_outside"] <= 4
  for key in ("any_head_any_span", "any_head_top1", "chance_any_head_any_span"):
    assert st[key] is None or 0 <= st[key] <= 1
  niah.plot_heatmap(grid, lengths, depths, tmp_path / "h.png", title="smoke")
  assert (tmp_path / "h.png").stat().st_size > 0
