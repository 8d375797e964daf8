"""Config as code: loading, dotted --set overrides, type parsing and errors."""

from __future__ import annotations

import dataclasses
import glob
import os
import shlex
import subprocess
import sys

import pytest

import attn
from train.config import (Config, ConfigError, DataConfig, apply_overrides, load_config,
                          parse_value, to_dict)
from train.model import ATTENTION_TYPES, ModelConfig

from tests.train_helpers import MICRO_CONFIG, REPO, subprocess_env

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
CONFIG_FILES = [p for p in CONFIG_FILES if not p.endswith("__init__.py")]


def test_every_config_file_loads_and_is_valid():
  assert any(p.endswith("tiny.py") for p in CONFIG_FILES)
  seen_types = set()
  for path in CONFIG_FILES:
    config = load_config(path)
    assert isinstance(config, Config), path
    assert isinstance(config.model, ModelConfig), path
    seen_types.update(config.model.layer_types)
  # One config per attention type (or a hybrid covering it).
  assert seen_types == set(ATTENTION_TYPES)


def test_overrides_parse_to_field_types():
  base = load_config(MICRO_CONFIG)
  cfg = apply_overrides(base, [
      "model.ppa_p=0.25", "steps=100", "learning_rate=1e-4",
      "mesh_shape=2,2,2", "data.shuffle=false", "model.superlinear.num_spans=3",
      "model.layer_pattern=ppa,superlinear", "model.num_layers=2",
      "model.attn_implementation=none",
      "workdir=/tmp/x y", "model.tie_embeddings=no", "steps=120"])
  assert cfg.model.ppa_p == 0.25 and cfg.model.layer_types == ("ppa", "superlinear")
  assert cfg.steps == 120 and isinstance(cfg.steps, int)  # later --set wins
  assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)
  assert cfg.mesh_shape == (2, 2, 2)
  assert cfg.data.shuffle is False
  assert cfg.model.superlinear == attn.SuperlinearConfig(num_spans=3)
  assert cfg.model.layer_pattern == ("ppa", "superlinear")
  assert cfg.model.attn_implementation is None
  assert cfg.workdir == "/tmp/x y"
  assert cfg.model.tie_embeddings is False
  # The base is frozen and untouched.
  assert base.steps == 30 and base.model.attention == "dense"
  with pytest.raises(dataclasses.FrozenInstanceError):
    base.steps = 3


@pytest.mark.parametrize("override, words", [
    ("nope=1", ["nope", "unknown key"]),
    ("model.nope=1", ["model.nope", "unknown key 'nope' in model"]),
    ("steps=abc", ["steps", "an int"]),
    ("steps=1.5", ["steps", "an int"]),
    ("learning_rate=fast", ["learning_rate", "a number"]),
    ("data.shuffle=maybe", ["data.shuffle", "bool"]),
    ("mesh_shape=2,2", ["mesh_shape", "3 comma-separated"]),
    ("steps=0", ["steps", ">= 1"]),
    ("batch_size=10", ["batch_size", "divisible by grad_accum"]),  # grad_accum set below
    ("model.attention=flash", ["model.attention", "must be one of"]),
    ("model.num_kv_heads=3", ["model.num_kv_heads", "divide"]),
    ("model=dense", ["model", "is a section"]),
    ("model.superlinear.search_power=2", ["model.superlinear.search_power", "(0, 1]"]),
    ("steps", ["expected key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
  base = apply_overrides(load_config(MICRO_CONFIG), ["grad_accum=4", "batch_size=8"])
  with pytest.raises(ConfigError) as e:
    apply_overrides(base, [override])
  for w in words:
    assert w in str(e.value), (override, str(e.value))


def test_parse_value_types():
  from typing import Literal, Optional
  assert parse_value("3", int) == 3 and parse_value("1e3", int) == 1000
  assert parse_value(" 2.5 ", float) == 2.5
  assert parse_value("(1, 2)", tuple[int, int]) == (1, 2)
  assert parse_value("", tuple[str, ...]) == ()
  assert parse_value("None", Optional[int]) is None
  assert parse_value("7", Optional[int]) == 7
  assert parse_value("b", Literal["a", "b"]) == "b"
  with pytest.raises(ValueError, match="one of 'a', 'b'"):
    parse_value("c", Literal["a", "b"])


def test_config_validation():
  with pytest.raises(ValueError, match="mesh_shape"):
    Config(mesh_shape=(-1, -1, 1))
  with pytest.raises(ValueError, match="max_bytes"):
    DataConfig(max_bytes=-1)
  d = to_dict(load_config(MICRO_CONFIG))
  assert d["model"]["superlinear"]["num_spans"] == 2 and d["mesh_shape"] == [-1, 1, 1]


def test_cli_errors_exit_2_naming_the_key(tmp_path):
  env = subprocess_env()
  base = [sys.executable, "-m", "train", "--config", MICRO_CONFIG]
  r = subprocess.run(base + ["--set", "modle.attention=ppa", "--set", f"workdir={tmp_path}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "modle" in r.stderr and "unknown key" in r.stderr
  r = subprocess.run(base + ["--set", "model.ppa_p=2", "--print-config"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "model.ppa_p" in r.stderr and "[0, 1]" in r.stderr
  r = subprocess.run([sys.executable, "-m", "train", "--config", str(tmp_path / "missing.py")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "no such file" in r.stderr
  r = subprocess.run(base + ["--set", "model.attention=sliding", "--set", "steps=7",
                             "--print-config"], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert '"attention": "sliding"' in r.stdout and '"steps": 7' in r.stdout


# -- settings that have no effect ------------------------------------------------


HYBRID = os.path.join(REPO, "configs", "tiny_hybrid.py")


@pytest.mark.parametrize("overrides, words", [
    (["model.attention=ppa", "model.ppa_p=0.5"], ["model.attention", "model.layer_pattern"]),
    (["model.ppa_p=0.25"], ["model.ppa_p", "model.layer_pattern", "ppa"]),
])
def test_overridden_attention_ignored_by_layer_pattern_is_an_error(overrides, words):
  with pytest.raises(ConfigError) as e:
    apply_overrides(load_config(HYBRID), overrides)
  for w in words:
    assert w in str(e.value), str(e.value)


def test_settings_of_absent_layer_types_are_errors():
  base = load_config(MICRO_CONFIG)  # one dense layer
  assert base.model.layer_types == ("dense",)
  for override, key in [("model.window=8", "model.window"),
                        ("model.superlinear.num_spans=3", "model.superlinear.num_spans"),
                        ("model.search_key=accumulated", "model.search_key")]:
    with pytest.raises(ConfigError, match="has no effect") as e:
      apply_overrides(base, [override])
    assert key in str(e.value) and "dense" in str(e.value)
  # The same settings are fine where a layer uses them, whatever the order.
  cfg = apply_overrides(base, ["model.window=8", "model.attention=sliding"])
  assert cfg.model.window == 8 and cfg.model.layer_types == ("sliding",)
  cfg = apply_overrides(load_config(HYBRID), ["model.layer_pattern=none", "model.attention=ppa"])
  assert set(cfg.model.layer_types) == {"ppa"}


def test_readme_hybrid_command_trains_a_ppa_layer():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  section = readme.split("## Training", 1)[1].split("\n## ", 1)[0]
  (line,) = [ln for ln in section.splitlines() if "tiny_hybrid.py" in ln]
  sets = shlex.split(line)
  overrides = [sets[i + 1] for i, a in enumerate(sets) if a == "--set"]
  assert "model.ppa_p=0.5" in overrides
  cfg = apply_overrides(load_config(HYBRID), [o for o in overrides
                                              if not o.startswith("workdir=")])
  assert "ppa" in cfg.model.layer_types and cfg.model.ppa_p == 0.5
  assert "superlinear" in cfg.model.layer_types and "sliding" in cfg.model.layer_types


# -- validated once, as a whole --------------------------------------------------


def test_overrides_are_validated_once_whatever_their_order():
  base = load_config(MICRO_CONFIG)
  base = apply_overrides(base, ["model.attention=superlinear"])
  sets = ["model.superlinear.search_power=0.3", "model.superlinear.span_power=0.9"]
  a = apply_overrides(base, sets)
  b = apply_overrides(base, sets[::-1])
  assert a == b
  assert (a.model.superlinear.search_power, a.model.superlinear.span_power) == (0.3, 0.9)
  # Either value alone leaves an invalid pair: refused, naming the key.
  with pytest.raises(ConfigError, match="search_power=0.3"):
    apply_overrides(base, sets[:1])


@pytest.mark.parametrize("override, words", [
    ("seed=-1", ["seed=-1", "[0, 2**32 - 1]"]),
    ("seed=4294967296", ["seed=4294967296", "[0, 2**32 - 1]"]),
    ("workdir=", ["workdir", "current directory"]),
    ("workdir=  ", ["workdir", "current directory"]),
])
def test_seed_and_workdir_are_checked_naming_the_key(override, words):
  with pytest.raises(ConfigError) as e:
    apply_overrides(load_config(MICRO_CONFIG), [override])
  for w in words:
    assert w in str(e.value), str(e.value)


def test_unbuildable_attention_is_refused_before_the_workdir_exists(tmp_path, monkeypatch):
  from train import loop
  from train import model as model_lib
  from train import preflight

  def unavailable(kind, config, *args, **kwargs):
    raise NotImplementedError(f"{kind}: this implementation is not available")

  config = dataclasses.replace(load_config(MICRO_CONFIG), workdir=str(tmp_path / "w"))
  preflight.check_attention(config)  # the real op builds
  monkeypatch.setattr(model_lib, "attend", unavailable)
  with pytest.raises(ConfigError, match="model.attn_implementation=None: the 'dense' "
                     "attention .* NotImplementedError: dense: this implementation"):
    loop.train(config)
  assert not os.path.exists(tmp_path / "w")


def test_unbuildable_attention_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  """An attention op that cannot be built for the config (here: an op that
  raises NotImplementedError, as `implementation="pallas"` did before its
  kernels existed) is a ConfigError naming the setting, raised before the
  workdir exists."""
  from train import loop, model as model_lib
  real = model_lib.attend

  def attend(kind, *args, **kwargs):
    if kind == "dense":
      raise NotImplementedError("dense: not available")
    return real(kind, *args, **kwargs)

  monkeypatch.setattr(model_lib, "attend", attend)
  config = apply_overrides(load_config(MICRO_CONFIG),
                           [f"workdir={tmp_path / 'w'}", "model.layer_pattern=dense,sliding"])
  with pytest.raises(ConfigError, match=r"model.attn_implementation=.*'dense' attention"):
    loop.train(config)
  assert not os.path.exists(tmp_path / "w")


def test_pallas_on_cpu_is_refused_unless_interpret_is_allowed(tmp_path):
  """On CPU the Pallas kernels only run in interpret mode (for tests): a
  training config asking for them is refused before the workdir exists,
  unless `model.allow_interpret=true` forces it."""
  import jax
  from train import loop, preflight
  if jax.default_backend() != "cpu":
    pytest.skip("the refusal is for backends without compiled Pallas kernels")
  config = apply_overrides(load_config(MICRO_CONFIG),
                           [f"workdir={tmp_path / 'w'}", "model.attn_implementation=pallas"])
  with pytest.raises(ConfigError, match="interpret mode.*model.allow_interpret=true"):
    loop.train(config)
  assert not os.path.exists(tmp_path / "w")
  forced = apply_overrides(config, ["model.allow_interpret=true"])
  preflight.check_attention(forced)  # builds (abstractly) in interpret mode
  code = subprocess.run(
      [sys.executable, "-m", "train", "--config", MICRO_CONFIG, "--set",
       f"workdir={tmp_path / 'w'}", "--set", "model.attn_implementation=pallas"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert code.returncode == 2 and "interpret mode" in code.stderr, code.stderr
