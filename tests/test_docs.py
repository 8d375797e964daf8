"""Statements of the README that name code: kept equal to the code."""

from __future__ import annotations

import pathlib
import re

from train import resume

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_resumable_keys_are_train_resume_keys():
  text = " ".join((ROOT / "README.md").read_text().split())
  start = text.index("only these keys may differ from the saved `config.json`")
  listed = text[start:text.index("Other changes", start)]
  keys = set(re.findall(r"`([a-z_.]+)`", listed)) - {"config.json", "train/resume.py"}
  assert "RESUMABLE_KEYS" in listed
  assert keys == set(resume.RESUMABLE_KEYS)


def test_training_doc_resumable_keys_are_train_resume_keys():
  text = " ".join((ROOT / "docs" / "training.md").read_text().split())
  start = text.index("These keys may change freely")
  listed = text[start:text.index("Any other difference", start)]
  keys = set(re.findall(r"`([a-z_.]+)`", listed)) - {"train/resume.py"}
  assert keys == set(resume.RESUMABLE_KEYS)


def test_readme_training_commands_each_name_a_workdir():
  text = (ROOT / "README.md").read_text()
  block = text[text.index("## Training"):]
  block = block[block.index("```bash") + 7:]
  block = block[:block.index("```")]
  commands = [line for line in block.splitlines() if line.strip()]
  assert commands
  for line in commands:
    assert "--set workdir=" in line or "--workdir " in line, line
