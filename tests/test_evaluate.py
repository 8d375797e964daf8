"""train.evaluate: per-position NLL, bits per byte, position buckets, and the
held-out validation inside a training run (metrics.jsonl and progress line)."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import data as data_lib
from train import evaluate
from train import loop
from train.config import DataConfig, load_config
from train.model import Transformer

from tests.train_helpers import MICRO_CONFIG


def _numpy_nll(logits, targets):
  """Plain log-softmax cross entropy: logits [b, s, v], targets [b, s]."""
  logits = np.asarray(logits, np.float64)
  out = np.zeros(targets.shape)
  for i in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      row = logits[i, t]
      m = row.max()
      out[i, t] = m + math.log(np.exp(row - m).sum()) - row[targets[i, t]]
  return out


def test_token_nll_matches_numpy_cross_entropy():
  config = load_config(MICRO_CONFIG).model
  model = Transformer(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 256, size=(2, 9)).astype(np.int32)
  nll = evaluate.token_nll(model, jnp.asarray(tokens))
  chex.assert_shape(nll, (2, 8))
  logits = model(jnp.asarray(tokens[:, :-1]))
  chex.assert_trees_all_close(np.asarray(nll, np.float64), _numpy_nll(logits, tokens[:, 1:]),
                              atol=1e-4, rtol=1e-5)
  # A uniform model costs exactly 8 bits per byte.
  assert evaluate.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0)
  with pytest.raises(ValueError, match="count"):
    evaluate.bits_per_byte(1.0, 0)


def test_buckets_on_hand_made_nll():
  assert evaluate.bucket_edges(100) == [0, 100]
  assert evaluate.bucket_edges(128) == [0, 128]
  assert evaluate.bucket_edges(3072) == [0, 128, 512, 2048, 3072]
  nll = np.zeros((2, 600))
  nll[:, :128] = math.log(2)          # 1 bit
  nll[:, 128:512] = 3 * math.log(2)   # 3 bits
  nll[0, 512:] = 2 * math.log(2)
  nll[1, 512:] = 4 * math.log(2)      # mean 3 bits
  got = evaluate.bucket_bits(nll, [0, 128, 512, 600])
  assert [(b["lo"], b["hi"], b["count"]) for b in got] == [
      (0, 128, 256), (128, 512, 768), (512, 600, 176)]
  np.testing.assert_allclose([b["bits_per_byte"] for b in got], [1.0, 3.0, 3.0])


@pytest.mark.slow  # a real loop.train run (6 steps, 2 evals) plus a restore: ~10-20 s of CPU
def test_training_reports_heldout_bits_per_byte(tmp_path):
  base = load_config(MICRO_CONFIG)
  config = dataclasses.replace(
      base, workdir=str(tmp_path / "run"), steps=6, log_every=4, checkpoint_every=0,
      eval_every=3, eval_batches=2, async_checkpoints=False,
      data=DataConfig(source="shakespeare", max_bytes=100_000, num_threads=0))
  stream = io.StringIO()
  real = loop.Progress

  class Captured(real):
    def __init__(self, *a, **kw):
      super().__init__(*a, stream=stream, **kw)

  loop.Progress = Captured
  try:
    result = loop.train(config, handle_signals=False)
  finally:
    loop.Progress = real
  assert result.status == "done"
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  # Eval steps 3 and 6 carry the value; log step 4 does not.
  assert [r["step"] for r in records] == [3, 4, 6]
  vals = {r["step"]: r.get("val_bits_per_byte") for r in records}
  assert vals[4] is None and 0 < vals[6] < vals[3] < 9
  assert "val " in stream.getvalue() and f"{vals[6]:.3f} bpb" in stream.getvalue()
  # Oracle: the final params, restored, scored on the same held-out windows.
  trainer = loop.Trainer.cached(config)
  from train import checkpoint as ckpt_lib
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run"), keep=1, async_save=False)
  step, state, _ = ck.restore_latest(trainer.abstract_state)
  ck.close()
  assert step == 6
  model = nnx.merge(trainer.graphdef, state["params"], trainer.init_rest())
  batches = data_lib.heldout_batches(config, 2, shard_index=0, shard_count=1)
  held = data_lib.load_split("shakespeare", "heldout", 100_000)
  total = count = 0
  for b in batches:
    assert b.shape == (config.batch_size, config.seq_len + 1)
    for row in b:  # the rows are held-out text, not training text
      assert bytes(row.astype(np.uint8).tobytes()) in bytes(held)
    logits = model(jnp.asarray(b[:, :-1]))
    total += _numpy_nll(logits, b[:, 1:]).sum()
    count += b[:, 1:].size
  assert vals[6] == pytest.approx(total / count / math.log(2), rel=1e-4)
