"""The linter's configuration ([tool.ruff] in pyproject.toml) holds for the whole repository."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  done = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, f"ruff check . (run it with --fix for the fixable ones):\n{done.stdout}{done.stderr}"
