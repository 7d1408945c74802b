"""The import contracts in pyproject.toml ([tool.importlinter]) hold: imports point one way."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lint_imports():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("lint-imports (import-linter) is not installed")
    proc = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        # grimp must find our packages from the checkout, installed or not.
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
