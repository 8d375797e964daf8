"""The wheel holds the library only (`attn`, `pallas_kernels`), versioned
from `attn.__version__`, typed (`py.typed`) and licensed (LICENSE)."""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import pytest

import attn

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = {"attn", "pallas_kernels"}


def setup_cfg() -> configparser.ConfigParser:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg


def _lines(value: str) -> list[str]:
  return [s.strip() for s in value.splitlines() if s.strip()]


def repo_packages() -> list[str]:
  """Dotted names of every directory with an `__init__.py` (outside hidden
  folders), as `setuptools.find_packages` walks them."""
  out = []
  for init in ROOT.rglob("__init__.py"):
    rel = init.parent.relative_to(ROOT)
    if any(part.startswith(".") for part in rel.parts) or not rel.parts:
      continue
    out.append(".".join(rel.parts))
  return sorted(out)


def test_find_config_selects_the_library_only():
  cfg = setup_cfg()
  assert cfg["options"]["packages"].strip() == "find:"
  include = _lines(cfg["options.packages.find"]["include"])
  selected = [p for p in repo_packages() if any(fnmatch.fnmatchcase(p, pat) for pat in include)]
  assert {p.split(".")[0] for p in selected} == LIBRARY
  # Every sub-folder of the library holding Python files is a package, so
  # `find:` drops none of it.
  for top in LIBRARY:
    for py in (ROOT / top).rglob("*.py"):
      dotted = ".".join(py.parent.relative_to(ROOT).parts)
      assert dotted in selected, f"{py} would be left out of the wheel"
  for name in ("train", "eval", "configs", "tests"):
    assert name in {p.split(".")[0] for p in repo_packages()}
    assert not any(p.split(".")[0] == name for p in selected)


def test_version_is_single_sourced_and_typed_and_licensed():
  cfg = setup_cfg()
  assert cfg["metadata"]["version"].strip() == "attr: attn.__version__"
  parts = attn.__version__.split(".")
  assert len(parts) == 3 and all(p.isdigit() for p in parts)
  assert cfg["metadata"]["license"].strip() == "Apache-2.0"
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  data = cfg["options.package_data"]
  for top in LIBRARY:
    assert "py.typed" in _lines(data[top])
    assert (ROOT / top / "py.typed").is_file()


def _can_build_offline() -> bool:
  return all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))


@pytest.mark.skipif(not _can_build_offline(),
                    reason="setuptools and wheel are not installed (a wheel build "
                           "without build isolation needs them)")
def test_built_wheel_holds_only_the_library(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", str(tmp_path), str(ROOT)],
                 check=True, capture_output=True, timeout=300)
  (wheel,) = tmp_path.glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == LIBRARY
  assert f"-{attn.__version__}-" in wheel.name
  assert {"attn/py.typed", "pallas_kernels/py.typed", "attn/layers.py"} <= set(names)
  assert any(n.endswith("LICENSE") for n in names)


def test_public_ops_are_annotated():
  """Every parameter and the return of each public op carries a type hint
  (arrays as `jax.typing.ArrayLike`), so a type checker sees the API."""
  import inspect
  import typing

  import attn
  from jax.typing import ArrayLike

  for name in attn.ops.OPS + ("superlinear_attention_with_anchors",):
    fn = getattr(attn, name)
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    missing = [p for p in sig.parameters if p not in hints]
    assert not missing, f"{name}: no annotation for {missing}"
    assert "return" in hints, name
    assert hints["q"] is ArrayLike and hints["k"] is ArrayLike, name
