"""The README's two set-up commands stay true: CI runs the test command verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks():
  return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_exactly_the_readme_test_command():
  test_cmds = [line for block in _bash_blocks() for line in block.splitlines()
               if "pytest" in line]
  assert len(test_cmds) == 1, test_cmds
  ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
  assert test_cmds[0].strip() in ci_lines


def test_readme_main_command_names_an_existing_module():
  main = [line for block in _bash_blocks() for line in block.splitlines()
          if "pip install" in line and "pytest" not in line]
  assert len(main) == 1
  module = re.search(r"python -m ([\w.]+)", main[0]).group(1)
  path = ROOT / module.replace(".", "/")
  assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
