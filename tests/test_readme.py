"""The README's code runs as written, and its test command is what CI runs."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run(capsys):
  """The quick start runs (the guides' code: tests/test_docs.py)."""
  blocks = _blocks("python")
  assert blocks
  namespace: dict = {"__name__": "readme"}
  for i, code in enumerate(blocks):
    if "torch" in code and importlib.util.find_spec("torch") is None:
      pytest.skip(f"README block {i} and later need torch (extra 'torch')")
    exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "(4, 32, 8, 8, 16) (4, 16)" in out  # the quick start's printed shapes


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
  bash = _blocks("bash")
  main_job, tests = bash[0].strip(), bash[1].strip()
  assert "examples/train_cnn.py" in main_job and "pip install" in main_job
  assert "pytest" in tests and "pip install" in tests
  ci = [line.strip() for line in
        (ROOT / ".ci" / "run").read_text().strip().splitlines()]
  # The main job is the README's command, then the linters, the
  # newest-versions suite and the wheel's check.
  assert tests in ci and ci[ci.index(tests) + 1:] == [
      "", "bash .ci/lint", "bash .ci/newest", "bash .ci/wheel"]
  assert "-c .ci/oldest.txt" in tests
