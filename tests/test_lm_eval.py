"""End-to-end runs of eval.lm (train a tiny run, score it by position) and
eval.ppa_sweep, plus docs/results.md assembly from their JSON files."""

from __future__ import annotations

import json
import math
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval import lm as lm_lib
from eval import ppa_sweep
from eval import results as results_lib
from train import data as data_lib

from tests.train_helpers import MICRO_CONFIG


def _tiny_config(tmp_path):
  path = tmp_path / "tiny_lm.py"
  path.write_text(textwrap.dedent(f"""
      import dataclasses, importlib.util
      from train.config import DataConfig
      spec = importlib.util.spec_from_file_location("micro", {MICRO_CONFIG!r})
      micro = importlib.util.module_from_spec(spec); spec.loader.exec_module(micro)
      def get_config():
        c = micro.get_config()
        return dataclasses.replace(c, steps=3, seq_len=16, checkpoint_every=0, log_every=1,
                                   eval_every=2, eval_batches=1, async_checkpoints=False,
                                   data=DataConfig(source="shakespeare", max_bytes=50_000,
                                                   num_threads=0))
      """))
  return str(path)


@pytest.mark.slow  # end to end: trains, checkpoints, compiles 2 lengths (~15 s of CPU)
def test_lm_command_trains_and_scores_by_position(tmp_path):
  config = _tiny_config(tmp_path)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  (tmp_path / "out").mkdir()
  results_lib.write(out)                        # results.md exists: commands refresh it
  lm_lib.main(["--config", config, "--workdir", workdir, "--out", out,
               "--lengths", "16", "40", "--windows", "3"])
  res = json.loads((tmp_path / "out" / "lm.json").read_text())
  run = res["runs"]["run"]
  assert run["step"] == 3 and run["layer_types"] == ["dense"]
  works = [w for w, _ in data_lib.shakespeare_documents()]
  assert run["heldout_works"] == data_lib.split_works(works)[1]
  assert "python -m train --config" in run["train_command"]
  assert [e["length"] for e in run["lengths"]] == [16, 40]
  for e in run["lengths"]:
    b = e["buckets"]
    assert b[0]["lo"] == 0 and b[-1]["hi"] == e["length"]
    # The overall value is the count-weighted mean of the buckets.
    total = sum(x["bits_per_byte"] * x["count"] for x in b) / sum(x["count"] for x in b)
    assert e["bits_per_byte"] == pytest.approx(total, rel=1e-6)
  # Oracle for L = 40: the restored model's NLL on the same held-out windows.
  cfg = lm_lib.load_run_config(workdir)
  from train import checkpoint as ckpt_lib
  from train import loop
  trainer = loop.Trainer(cfg)
  ck = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
  _, state, _ = ck.restore_latest(trainer.abstract_state)
  ck.close()
  model = nnx.merge(trainer.graphdef, state["params"], trainer.init_rest())
  rows = data_lib.heldout_windows(data_lib.load_split("shakespeare", "heldout", 50_000), 41, 3)
  logits = np.asarray(model(jnp.asarray(rows[:, :-1])), np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]
  assert run["lengths"][1]["bits_per_byte"] == pytest.approx(nll.mean() / math.log(2), rel=1e-4)
  assert (tmp_path / "out" / "lm.png").stat().st_size > 0
  md = (tmp_path / "out" / "results.md").read_text()
  assert "`run` | dense | 3 | 16 (trained)" in md
  assert "Held-out split (4 works" in md
  assert "Not run yet: `python -m eval.ppa_sweep`" in md
  # A second call with the finished run does not retrain it.
  lm_lib.main(["--config", config, "--workdir", workdir, "--out", out,
               "--lengths", "16", "--windows", "2"])
  assert json.loads((tmp_path / "out" / "lm.json").read_text())["runs"]["run"]["step"] == 3


def _causal_window_keys(L, w):
  return sum(min(i + 1, w) for i in range(L))


def test_attended_fraction_by_hand():
  import attn
  sl = attn.SuperlinearConfig(sw_index=3)
  L, w = 64, 4
  causal = L * (L + 1) // 2
  assert ppa_sweep.attended_fraction("p=0", L, w, sl)["keys"] == _causal_window_keys(L, w)
  assert ppa_sweep.attended_fraction("p=1", L, w, sl)["fraction"] == 1.0
  assert ppa_sweep.attended_fraction("dense", L, w, sl)["keys"] == causal
  # p = 1/2 keeps the window plus offsets d = s^2 beyond it (Python loop oracle).
  half = sum(1 for i in range(L) for d in range(i + 1)
             if d < w or math.isqrt(d) ** 2 == d)
  got = ppa_sweep.attended_fraction("p=0.5", L, w, sl)["keys"]
  assert abs(got - half) <= L                     # d vs d + 1 convention: one offset per row
  sup = ppa_sweep.attended_fraction("superlinear", L, w, sl)
  assert not sup["exact"] and 0 < sup["fraction"] <= 1


@pytest.mark.slow  # end to end: compiles and trains 2 models plus op timings (~15 s of CPU)
def test_ppa_sweep_command_end_to_end(tmp_path):
  out = str(tmp_path)
  ppa_sweep.main(["--out", out, "--seq-len", "24", "--window", "4", "--d-model", "16",
                  "--num-layers", "1", "--steps", "3", "--batch-size", "2",
                  "--warm-steps", "1", "--warm-len", "16", "--warm-batch", "2",
                  "--eval-windows", "2", "--niah-samples", "8", "--seeds", "0",
                  "--p", "0", "1", "--no-references"])
  sweep = json.loads((tmp_path / "ppa_sweep.json").read_text())
  assert set(sweep["runs"]) == {"p=0/seed0", "p=1/seed0"}
  for r in sweep["runs"].values():
    assert 0 < r["heldout_bits_per_byte"] < 12 and 0 <= r["niah_accuracy"] <= 1
  assert sweep["cost"]["p=0"]["keys"] == _causal_window_keys(24, 4)
  assert sweep["cost"]["p=1"]["fraction"] == 1.0
  rows = results_lib.ppa_rows(sweep)
  assert [r["p"] for r in rows] == [0.0, 1.0]
  assert (tmp_path / "ppa_sweep.png").stat().st_size > 0
  md = "\n".join(results_lib.ppa_markdown(sweep))
  assert "| `p=0` | " in md and "issue" not in md.lower()
