"""Tests of eval.niah: the passkey and real-text generators, the span metric
against a plain-loop oracle, the report helpers, and tiny end-to-end runs."""

import json
import os

import numpy as np
import pytest

from eval import niah
from train import data as data_lib

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
  for v in ("dense", "sliding", "superlinear_k", "superlinear_acc"):
    cfg = niah.model_config(v, niah.PasskeyTask())
    assert cfg.vocab_size == niah.PasskeyTask().vocab_size
    assert cfg.window == cfg.superlinear.window == 15
  assert niah.model_config("superlinear_acc", TASK).search_key == "accumulated"
  assert niah.model_config("superlinear_k", TASK).search_key == "k"
  import attn
  hybrid = niah.model_config("hybrid", niah.TextNeedleTask(), superlinear=attn.SuperlinearConfig())
  assert hybrid.layer_types == ("sliding", "superlinear") and hybrid.window == 63
  assert hybrid.vocab_size == 256 + 2 + 16 + 16


TEXT = niah.TextNeedleTask(num_keys=6, num_values=5, max_distractors=3)


def test_text_needle_where_it_says_and_haystack_is_the_split():
  depths = np.array([0.0, 0.3, 1.0, 0.5])
  b = TEXT.batch(np.random.default_rng(0), 4, 200, depths, split="heldout", distractors=0)
  assert b.tokens.shape == (4, 200) and b.tokens.dtype == np.int32
  m = np.rint(depths * 195).astype(int)                   # round(d (L - 5))
  np.testing.assert_array_equal(b.marker_pos, m)
  np.testing.assert_array_equal(b.value_pos, m + 2)
  assert m[0] == 0 and m[2] + 2 == 197                    # depth 1: VALUE just before QUERY
  rows = np.arange(4)
  assert np.all(b.tokens[rows, m] == 256)
  keys = b.tokens[rows, m + 1]
  assert np.all(np.isin(keys, TEXT.key_ids))
  np.testing.assert_array_equal(b.tokens[rows, m + 2], b.targets)
  assert np.all(np.isin(b.targets, TEXT.value_ids))
  assert np.all(b.tokens[:, -2] == 257) and np.array_equal(b.tokens[:, -1], keys)
  held = bytes(data_lib.load_split("shakespeare", "heldout"))
  train = bytes(data_lib.load_split("shakespeare", "train"))
  for r in range(4):
    text = b.tokens[r].copy()
    assert np.sum(text >= 256) == 5                       # 3 needle tokens + QUERY KEY
    # Outside the needle and the query the sequence is a slice of held-out text.
    before = bytes(text[:m[r]].astype(np.uint8)) if m[r] else b""
    after = bytes(text[m[r] + 3:-2].astype(np.uint8))
    assert (before + b"") in held and after in held
    if len(after) > 60:
      assert after not in train
  tb = TEXT.batch(np.random.default_rng(0), 2, 300, 0.5, split="train", distractors=0)
  assert bytes(tb.tokens[0, 160:290].astype(np.uint8)) in train


def test_text_distractors_distinct_and_apart():
  b = TEXT.batch(np.random.default_rng(3), 64, 80, split="train", distractors=3)
  assert b.distractor_pos.shape == (64, 3)
  for r in range(64):
    starts = [b.marker_pos[r]] + list(b.distractor_pos[r])
    spans = sorted(starts)
    assert all(y - x >= 3 for x, y in zip(spans, spans[1:]))   # no overlap
    assert all(0 <= p <= 80 - 5 for p in starts)
    keys = [b.tokens[r, p + 1] for p in starts]
    values = [b.tokens[r, p + 2] for p in starts]
    assert all(b.tokens[r, p] == 256 for p in starts)
    assert len(set(keys)) == 4                                 # distinct keys
    assert all(v != b.targets[r] for v in values[1:])          # other values
    assert b.tokens[r, -1] == keys[0] and values[0] == b.targets[r]
    assert np.sum(b.tokens[r] == 256) == 4
  # Training draws the distractor count per batch in [0, max_distractors].
  counts = {TEXT.batch(np.random.default_rng(s), 2, 60).distractor_pos.shape[1]
            for s in range(40)}
  assert counts == {0, 1, 2, 3}
  c = TEXT.batch(np.random.default_rng(3), 64, 80, split="train", distractors=3)
  np.testing.assert_array_equal(b.tokens, c.tokens)             # seeded
  with pytest.raises(ValueError, match="max_distractors"):
    niah.TextNeedleTask(num_keys=3, max_distractors=3)
  with pytest.raises(ValueError, match="too short"):
    TEXT.batch(np.random.default_rng(0), 1, 12, distractors=3)


def _span_oracle(q, anchor, L, cfg):
  """Plain-arithmetic span of one anchor: [a - ceil(bb t^s), a + ceil(bf t^s)]
  clipped to [0, q - W]."""
  import math
  t = q + 1
  back = math.ceil(cfg.backward_factor * t ** cfg.span_power - 1e-9)
  fwd = math.ceil(cfg.forward_factor * t ** cfg.span_power - 1e-9)
  if anchor < 0:
    return None
  return max(anchor - back, 0), min(anchor + fwd, q - cfg.window)


def test_span_hits_against_loop_oracle():
  import attn
  cfg = attn.SuperlinearConfig(**niah.SUPERLINEAR_KW)
  L = 200
  rng = np.random.default_rng(0)
  q_pos = np.arange(L - 15, L)
  anchors = rng.integers(-1, L - 20, size=(3, 15, 2, 2))
  value_pos = np.array([10, 150, 190])
  got = niah.span_hits(q_pos, anchors, value_pos, L, cfg)
  for b in range(3):
    for i, q in enumerate(q_pos):
      for h in range(2):
        for k in range(2):
          span = _span_oracle(q, anchors[b, i, h, k], L, cfg)
          want = span is not None and span[0] <= value_pos[b] <= span[1]
          assert got[b, i, h, k] == want
  rand = niah.random_anchors(np.random.default_rng(1), q_pos, 2, L, cfg)
  assert rand.shape == (15, 2, 2)
  for i, q in enumerate(q_pos):
    stripes = {q + 1 - int(np.floor(j ** 2)) for j in range(4, 100)}
    for h in range(2):
      assert len(set(rand[i, h])) == 2 and all(a in stripes and a >= 0 for a in rand[i, h])


def test_coverage_fraction_by_hand():
  # Default config at L = 1024: window 63, spans of ceil(2*32) + ceil(32) + 1 = 97 keys.
  c = niah.coverage(1024, {})
  assert c["keys"] == 63 + 2 * 97 and c["fraction"] == pytest.approx(257 / 1024)
  assert niah.coverage(4096, {})["fraction"] < 0.12


def _fake_results():
  s = dict(preset="routing", task_kind="text", lengths=[100, 200], depths=[0.0, 1.0],
           train_len=100, window=10, task=dict(num_keys=4, num_values=4, max_distractors=0,
                                               source="shakespeare"))
  run = lambda v, g, anchors=None: dict(variant=v, seed=0, train_seconds=1.0, grid=g,
                                        history=[[1, 0.1, 1.0]], anchors=anchors)
  anchors = {"100": {"n_outside": 5, "layer1": {
      "any_head_any_span": 0.8, "chance_any_head_any_span": 0.3}}}
  return {"settings": s, "runs": {
      "hybrid/seed0": run("hybrid", [[1.0, 0.5], [1.0, 1.0]], anchors),
      "sliding/seed0": run("sliding", [[0.25, 0.0], [1.0, 1.0]])}}


def test_summary_and_targets_on_hand_made_results():
  r = _fake_results()
  summ = niah.summary(r)
  assert summ["hybrid"]["per_length"] == [1.0, 0.75]
  # depth 0: VALUE at 2 (outside the window at both lengths); depth 1: VALUE at
  # L - 3 (inside): beyond-window cells are row 0 only.
  assert summ["hybrid"]["beyond_window"] == pytest.approx(0.75)
  assert summ["sliding"]["beyond_window"] == pytest.approx(0.125)
  lines = "\n".join(niah.targets(r))
  assert "accuracy 1.00 (target >= 0.90): **met**" in lines
  assert "80% of the time against 30%" in lines and "**met**" in lines
  assert "2x: 0.75" in lines
  r["runs"]["hybrid/seed0"]["anchors"]["100"]["layer1"]["chance_any_head_any_span"] = 0.5
  assert "(target >= 2x): **missed**" in "\n".join(niah.targets(r))


def test_format_grid():
  text = niah.format_grid([[0.5, 1.0], [0.0, 0.25]], [64, 128], [0.0, 1.0])
  lines = text.splitlines()
  assert lines[0].split() == ["depth%", "64", "128"]
  assert lines[1].split() == ["0", "0.50", "1.00"]
  assert lines[-1].split() == ["mean", "0.25", "0.62"]


@pytest.mark.slow  # end to end: compiles, trains and evaluates two models (~15 s of CPU)
def test_quick_command_end_to_end(tmp_path):
  out = tmp_path / "q"
  niah.main(["--preset", "quick", "--out", str(out), "--steps", "2", "--train-len", "40",
             "--lengths", "40", "64", "--depths", "2", "--samples", "2", "--batch-size", "2",
             "--d-model", "16", "--anchor-samples", "3", "--eval-distractors", "2"])
  res = json.loads((out / "niah.json").read_text())
  assert set(res["runs"]) == {"hybrid_acc/seed0", "sliding/seed0"}
  hyb = res["runs"]["hybrid_acc/seed0"]
  assert np.asarray(hyb["grid"]).shape == (2, 2) and np.asarray(hyb["grid_multi"]).shape == (2, 2)
  st = hyb["anchors"]["40"]["layer1"]
  for key in ("any_head_any_span", "window_any", "chance_window_any"):
    assert st[key] is None or 0 <= st[key] <= 1
  md = (out / "niah.md").read_text()
  assert "issue" not in md.lower() and "window hit" in md
  assert (out / "niah_hybrid_acc.png").stat().st_size > 0


def test_train_and_eval_smoke(tmp_path):
  cfg = niah.model_config("superlinear_acc", TASK, d_model=16, num_heads=1,
                          num_kv_heads=1, head_dim=8, mlp_dim=16, num_layers=1)
  records = []
  model, history = niah.train_model(cfg, TASK, steps=3, batch_size=4, seq_len=24,
                                    log_every=1, progress=lambda *r: records.append(r),
                                    warm_steps=1, warm_len=16, warm_batch=2)
  assert [h[0] for h in history] == [1, 2, 3] and len(records) == 3
  with pytest.raises(ValueError, match="warm_steps"):
    niah.train_model(cfg, TASK, steps=3, warm_steps=3, warm_len=16, warm_batch=2)
  with pytest.raises(ValueError, match="lm_weight"):
    niah.train_model(cfg, TASK, steps=1, lm_weight=1.0)
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


def test_results_md_lists_the_routing_run_and_its_variants(tmp_path):
  from eval import results as results_lib

  r = _fake_results()
  r["settings"].update(command_args="--preset routing", seeds=[0])
  (tmp_path / "niah_routing.json").write_text(json.dumps(r))
  r["settings"]["command_args"] = "--preset routing --steps 750 --name niah_routing_long"
  r["runs"]["hybrid/seed0"]["grid"] = [[0.0, 0.0], [1.0, 1.0]]
  (tmp_path / "niah_routing_long.json").write_text(json.dumps(r))
  md = open(results_lib.write(str(tmp_path))).read()
  main, long = md.split("### The same task, other settings: `niah_routing_long`")
  assert "`python -m eval.niah --preset routing`" in main and "| `hybrid` | 1.00 | 0.75 |" in main
  assert "--steps 750" in long and "| `hybrid` | 0.50 | 0.50 |" in long
  assert "[niah_routing_long.md](niah_routing_long.md)" in long


def test_report_states_only_what_the_numbers_say(tmp_path):
  """No "0 to 0 distractors", no uninformative window columns, no placeholder
  reading; a hand-written reading is kept."""
  r = _fake_results()
  r["settings"].update(preset="quick", steps=10, batch_size=2, lr=1e-3, seeds=[0],
                       superlinear={"sw_index": 2, "num_spans": 2}, samples=4,
                       anchor_samples=4, command_args="--preset quick")
  st = r["runs"]["hybrid/seed0"]["anchors"]["100"]["layer1"]
  st.update(any_head_top1=0.5, window_any=1.0, chance_window_any=1.0,
            correct_given_hit=1.0, correct_given_miss=0.0)
  md_path = tmp_path / "t.md"
  niah.write_report(r, str(tmp_path), "t")
  md = md_path.read_text()
  assert "0 to 0" not in md and "no distractor needles" in md
  assert "| window hit |" not in md and "chance 100%" in md
  assert "replace with a reading" not in md
  # hybrid: column L=100 of [[1.0, 0.5], [1.0, 1.0]] averages 1.00 = 4 x chance 1/4;
  # beyond the window only depth 0 counts: (1.0 + 0.5) / 2.
  assert "`hybrid`: 1.00 at the training length L = 100 (4.0x chance)" in md
  assert "0.75 on the needles beyond the 10-key window" in md
  r["settings"]["task"]["max_distractors"] = 2
  st["chance_window_any"] = 0.5
  hand = md.replace(md.split("<!-- reading -->")[1].split("<!-- /reading -->")[0],
                    "\nA reading written by hand.\n")
  md_path.write_text(hand)
  niah.write_report(r, str(tmp_path), "t")
  md = md_path.read_text()
  assert "Training draws 0 to 2 distractor needles" in md
  assert "| window hit | window chance |" in md
  assert "A reading written by hand." in md and "4.0x chance" not in md
