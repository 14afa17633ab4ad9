"""Run directories: created whole or not at all.

Layout::

    <runs_root>/<slug>-<UTC timestamp>/
        config.yaml      resolved config (what the ranks read)
        job.sbatch       rendered batch script (Slurm)   | launch.sh (local: the exact command)
        step.sh          per-node step script (Slurm)
        manifest.json    library versions, project git commit, command line, host
        job.json         backend, job id(s), state as last seen
        logs/            job output (%x_%j.out/.err on Slurm, local.out locally)
        control/         save/exit requests between the batch shell and the ranks
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.sbatch import job_name_slug

JOB_FILE = "job.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"


def new_run_dir_path(runs_root: str, run_name: str, now: float | None = None) -> Path:
    """A fresh, absolute, not-yet-existing run directory path."""
    root = Path(runs_root).expanduser().absolute()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    base = root / f"{job_name_slug(run_name)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def create_run_dir(path: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    """Write every file into a temporary sibling, then rename it into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for sub in ("logs", "control"):
            (tmp / sub).mkdir()
        for name, text in files.items():
            target = tmp / name
            target.write_text(text)
            if name in executable:
                target.chmod(0o755)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_run_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_job_record(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = run_dir / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / JOB_FILE)


def read_job_record(run_dir: Path) -> dict[str, Any]:
    """The run's job record; a corrupt or unreadable one is reported as state UNKNOWN with the reason
    (never a traceback: ``list``, ``status`` and ``logs`` keep working)."""
    path = run_dir / JOB_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        return {"state": "UNKNOWN", "reason": f"{path} is unreadable ({type(exc).__name__}: {exc}); the run's logs "
                "are in its logs/ directory"}
    if not isinstance(record, dict):
        return {"state": "UNKNOWN", "reason": f"{path} is not a JSON object"}
    return record


def list_run_dirs(runs_root: str) -> list[Path]:
    """Run directories under runs_root, oldest first (by creation time in job.json/mtime)."""
    root = Path(runs_root).expanduser()
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).exists()]
    return sorted(runs, key=lambda p: (p / CONFIG_FILE).stat().st_mtime)
