"""Helpers for end-to-end tests that drive the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"step=(\d+)/(\d+) loss=([0-9.eE+-]+)")


def launcher(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def losses(text: str) -> list[float]:
    return [float(m.group(3)) for m in STEP.finditer(text)]


def only_run(runs_root: Path) -> Path:
    runs = [p for p in runs_root.iterdir() if p.is_dir() and (p / "config.yaml").exists()]
    assert len(runs) == 1, runs
    return runs[0]


def job_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "job.json").read_text())
