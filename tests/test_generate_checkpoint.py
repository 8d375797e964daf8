"""`python -m train.generate`: text from a trained checkpoint with the KV cache."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from train import generate as gen
from train import loop
from train.config import load_config

from tests.train_helpers import MICRO_CONFIG, REPO, subprocess_env

PROMPT = b"To be, or not"
NEW = 12

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A micro model trained for 3 steps (a sliding and a superlinear layer)."""
  path = tmp_path_factory.mktemp("gen") / "run"
  base = load_config(MICRO_CONFIG)
  model = dataclasses.replace(base.model, num_layers=2, window=4,
                              layer_pattern=("sliding", "superlinear"),
                              search_key="accumulated")
  config = dataclasses.replace(base, workdir=str(path), steps=3, checkpoint_every=0,
                               model=model)
  assert loop.train(config).status == "done"
  return path


def test_greedy_generation_equals_the_full_forward_argmax(workdir):
  step, model = gen.restore_model(str(workdir))
  assert step == 3
  new = gen.generate_text(model, PROMPT, max_new_tokens=NEW)
  assert len(new) == NEW
  # Oracle: one full (cacheless) forward over prompt + generated text; by
  # causality its argmax at position i is the greedy choice after [0, i].
  seq = jnp.asarray([list(PROMPT + new)], jnp.int32)
  logits = np.asarray(model(seq))[0]
  expected = np.argmax(logits[len(PROMPT) - 1:-1], axis=-1)
  np.testing.assert_array_equal(np.frombuffer(new, np.uint8), expected)


def test_sampling_is_reproducible_with_its_seed(workdir):
  _, model = gen.restore_model(str(workdir))
  a = gen.generate_text(model, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=1)
  b = gen.generate_text(model, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=1)
  c = gen.generate_text(model, PROMPT, max_new_tokens=NEW, temperature=1.0, seed=2)
  assert a == b and a != c


def test_command_line(workdir, tmp_path):
  cmd = [sys.executable, "-m", "train.generate", "--workdir", str(workdir),
         "--prompt", PROMPT.decode(), "--max-new-tokens", str(NEW), "--json"]
  proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  _, model = gen.restore_model(str(workdir))
  assert out["step"] == 3
  assert bytes(out["tokens"]) == gen.generate_text(model, PROMPT, max_new_tokens=NEW)
  # No checkpoint: exit 2 naming the workdir.
  empty = subprocess.run([*cmd[:4], str(tmp_path), *cmd[5:]], cwd=REPO,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert empty.returncode == 2 and str(tmp_path) in empty.stderr
