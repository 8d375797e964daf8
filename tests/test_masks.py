"""Host-side tables and masks: PPA offsets, superlinear stripes and coverage, layouts."""

import dataclasses
import math

import hypothesis
import jax.numpy as jnp
import hypothesis.strategies as st
import numpy as np
import pytest

import attn
from attn import masks
from tests import attn_oracles

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)


# --------------------------------------------------------------------- PPA


def test_ppa_offsets_match_the_papers_examples():
  far = lambda p: [int(d) for d in masks.ppa_offsets(30, p=p, window=1) if d > 0][:10]  # noqa: E731
  assert far(0.75) == [1, 3, 5, 7, 9, 11, 14, 16, 19, 22]
  assert far(0.5) == [1, 4, 9, 16, 25]
  assert far(1 / 3) == [1, 8, 27]


@pytest.mark.parametrize("p", [0.2, 1 / 3, 0.5, 0.55, 0.625, 0.75, 0.9])
def test_ppa_offsets_count_is_floor_n_to_the_p(p):
  offs = masks.ppa_offsets(5000, p=p, window=1)
  far = offs[offs >= 1]
  for n in (1, 2, 7, 64, 100, 999, 4096, 5000):
    assert np.sum(far <= n) == math.floor(n ** p + 1e-9), n


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("window", [1, 5])
def test_ppa_mask_matches_the_definition(p, window):
  L = 70
  got = attn.ppa_mask(L, p=p, window=window)
  want = np.array([[k <= i and attn_oracles.ppa_kept_offset(i - k, p, window)
                    for k in range(L)] for i in range(L)])
  np.testing.assert_array_equal(got, want)


def test_ppa_mask_identities():
  L = 300
  np.testing.assert_array_equal(attn.ppa_mask(L, p=0.0, window=16),
                                attn.sliding_window_mask(L, window=16))
  np.testing.assert_array_equal(attn.ppa_mask(L, p=1.0, window=16), attn.causal_mask(L))


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_ppa_keys_per_query_grow_like_i_to_the_p(p):
  L, w = 1 << 14, 4
  offs = masks.ppa_offsets(L - 1, p=p, window=w)
  i = np.array([1 << e for e in range(8, 14)])
  rows = np.array([np.sum(offs <= x) for x in i])          # keys of query i
  expected = w + np.floor((i + 0.0) ** p + 1e-9) - math.floor((w - 1) ** p + 1e-9)
  np.testing.assert_allclose(rows, expected, atol=1)
  far = rows - w + math.floor((w - 1) ** p + 1e-9)        # power offsets in [1, i]
  slope = np.polyfit(np.log(i), np.log(far), 1)[0]
  assert abs(slope - p) < 0.05


def test_ppa_rejects_bad_arguments():
  with pytest.raises(ValueError, match="p=1.5"):
    attn.ppa_mask(8, p=1.5, window=4)
  with pytest.raises(ValueError, match="p=-0.1"):
    attn.ppa_offsets(8, p=-0.1, window=4)
  with pytest.raises(ValueError, match="window=0"):
    attn.ppa_mask(8, p=0.5, window=0)


# ------------------------------------------------------------- superlinear


@pytest.mark.parametrize("p", [0.5, 0.55, 0.6, 2 / 3, 0.75])
def test_stripe_offsets_are_exact_integer_floors(p):
  f = attn.stripe_offsets(3000, p)
  j = np.arange(1, 3001)
  # floor(j ** (1/p)) = r  <=>  r ** p <= j < (r + 1) ** p; checked with
  # integer powers where 1/p is rational with a small denominator.
  num, den = {0.5: (2, 1), 0.55: (20, 11), 0.6: (5, 3), 2 / 3: (3, 2), 0.75: (4, 3)}[p]
  # r <= j**(num/den)  <=>  r**den <= j**num  (exact big integers)
  for jj, r in zip(j.tolist(), f.tolist()):
    assert r ** den <= jj ** num < (r + 1) ** den, (jj, r)


def test_window_size_follows_sw_index():
  assert attn.SuperlinearConfig(sw_index=7).window == 63
  assert attn.SuperlinearConfig(sw_index=0, backward_factor=2.0).window == 0
  cfg = attn.SuperlinearConfig(sw_index=65, num_spans=3, backward_factor=3,
                               forward_factor=1, search_power=0.55, span_power=0.55)
  assert cfg.window == 2032


@st.composite
def superlinear_configs(draw):
  p = draw(st.sampled_from([0.34, 0.4, 0.5, 0.55, 0.6, 0.75, 0.9, 1.0]))
  sigma = draw(st.floats(min_value=max(0.0, 1 - p), max_value=1.0))
  bb = draw(st.floats(min_value=1.0, max_value=4.0))
  if abs(sigma - (1 - p)) < 1e-9:
    bb = max(bb, 1 / p)
  kwargs = dict(sw_index=draw(st.integers(0, 6)), num_spans=draw(st.integers(1, 3)),
                search_power=p, span_power=sigma, backward_factor=bb,
                forward_factor=draw(st.floats(0.0, 2.0)))
  try:
    return attn.SuperlinearConfig(**kwargs)
  except ValueError:
    hypothesis.reject()


@SETTINGS
@hypothesis.given(config=superlinear_configs(), seq_len=st.integers(1, 400))
def test_candidate_mask_is_causal_for_every_valid_config(config, seq_len):
  np.testing.assert_array_equal(
      attn.superlinear_candidate_mask(seq_len, config=config), attn.causal_mask(seq_len))


@pytest.mark.parametrize("kwargs", [
    dict(sw_index=0, backward_factor=1.9, forward_factor=0.0),   # holes from q=898
    dict(sw_index=0, backward_factor=1.0, forward_factor=1.0),   # misses 0 at q=7
    dict(sw_index=0, span_power=0.45, backward_factor=2.0),
    dict(search_power=0.75, span_power=0.5, backward_factor=0.1),
])
def test_configs_that_break_coverage_are_rejected(kwargs):
  with pytest.raises(ValueError, match="SuperlinearConfig"):
    attn.SuperlinearConfig(**kwargs)


@dataclasses.dataclass(frozen=True)
class _Unchecked:
  """A config that skips validation, to test the exact coverage criterion."""
  sw_index: int
  num_spans: int
  search_power: float
  span_power: float
  backward_factor: float
  forward_factor: float

  @property
  def window(self):
    return int(masks.stripe_offsets(self.sw_index + 1, self.search_power)[-1]) - 1


@pytest.mark.parametrize("p,sigma,bb,bf,s", [
    (0.5, 0.5, 1.9, 0.0, 0), (0.5, 0.5, 1.0, 1.0, 0), (0.5, 0.45, 2.0, 0.0, 0),
    (0.5, 0.5, 2.0, 0.0, 0), (0.55, 0.55, 3.0, 1.0, 3), (0.75, 0.3, 1.0, 1.0, 2)])
def test_first_hole_agrees_with_the_candidate_mask(p, sigma, bb, bf, s):
  cfg = _Unchecked(s, 2, p, sigma, bb, bf)
  L = 1000
  hole = masks.superlinear_first_hole(cfg, L)
  mask = masks.superlinear_candidate_mask(L, config=cfg)
  missing = np.nonzero(~np.all(mask == attn.causal_mask(L), axis=1))[0]
  first_missing_t = int(missing[0]) + 1 if missing.size else None
  assert hole == first_missing_t
  if (p, sigma, bb, bf, s) == (0.5, 0.5, 1.9, 0.0, 0):
    assert hole == 899      # the papers' "holes from q = 898"
  if (p, sigma, bb, bf, s) == (0.5, 0.5, 1.0, 1.0, 0):
    assert hole == 8 and not mask[7, 0]


def test_stripe_table_is_far_to_near_and_shared():
  cfg = attn.SuperlinearConfig(search_power=0.55, span_power=0.55, backward_factor=3.0)
  f = masks.superlinear_stripe_table(5000, cfg)
  assert np.all(np.diff(f) < 0)
  assert f[-1] == cfg.window + 1
  assert f[0] <= 5000 < masks.stripe_offsets(cfg.sw_index + f.size + 1, 0.55)[-1]


# ------------------------------------------------------------------ layout


@SETTINGS
@hypothesis.given(q_len=st.integers(1, 60), kv_len=st.integers(1, 60),
                  bq=st.sampled_from([1, 4, 8, 16]), bk=st.sampled_from([1, 4, 8, 16]),
                  density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_block_layout_round_trips_any_mask(q_len, kv_len, bq, bk, density, seed):
  mask = np.random.default_rng(seed).random((q_len, kv_len)) < density
  layout = attn.BlockLayout.from_mask(mask, block_q=bq, block_k=bk)
  np.testing.assert_array_equal(layout.to_mask(), mask)
  # Exactly the non-empty tiles are listed.
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  tiles = np.zeros((nq * bq, nk * bk), bool)
  tiles[:q_len, :kv_len] = mask
  nonempty = tiles.reshape(nq, bq, nk, bk).any(axis=(1, 3))
  assert layout.num_active_blocks == int(nonempty.sum())
  np.testing.assert_array_equal(layout.num_kv_blocks, nonempty.sum(axis=1))


def test_block_layout_visits_only_nonempty_blocks():
  L, w = 1024, 100
  layout = attn.BlockLayout.sliding_window(L, window=w, block_q=128, block_k=128)
  assert layout.kv_blocks.shape == (8, 2)
  assert layout.num_active_blocks == 15
  causal = attn.BlockLayout.causal(L, block_q=128, block_k=128)
  assert causal.num_active_blocks == 8 * 9 // 2
  # Full tiles share the FULL id; the diagonal tiles share one partial mask.
  assert causal.block_masks.shape[0] == 3
  assert hash(causal) == hash(attn.BlockLayout.causal(L)) and causal == attn.BlockLayout.causal(L)


def test_block_layout_rejects_bad_input():
  with pytest.raises(ValueError, match="mask"):
    attn.BlockLayout.from_mask(np.ones((4, 4)), block_q=2, block_k=2)
  with pytest.raises(ValueError, match="block_q"):
    attn.BlockLayout.from_mask(np.ones((4, 4), bool), block_q=0, block_k=2)
  with pytest.raises(ValueError, match="window"):
    attn.BlockLayout.sliding_window(16, window=0)


@pytest.mark.parametrize("seq_len", [0, -1, 2.5, True])
def test_candidate_mask_refuses_a_bad_length_naming_it(seq_len):
  with pytest.raises(ValueError, match="seq_len"):
    attn.superlinear_candidate_mask(seq_len, config=attn.SuperlinearConfig())


def test_head_dim_mismatch_names_the_fix():
  q = jnp.zeros((1, 4, 2, 8))
  k = jnp.zeros((1, 4, 2, 16))
  with pytest.raises(ValueError, match="head_dim mismatch.*same head_dim"):
    attn.dense_attention(q, k, k)
