"""The packages' typed public API stays mypy-clean (py.typed is shipped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "launcher", "cluster", "memory_predictor", "checkpointing", "monitoring", "trainer")


@pytest.mark.timeout(600)
def test_packages_are_mypy_clean() -> None:
    pytest.importorskip("mypy", reason="mypy is in the test extra (pip install -e '.[test]')")
    out = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary",
                          "--cache-dir", str(ROOT / ".mypy_cache"), *PACKAGES], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
