"""What produced a run: library versions, the project's git commit, the command line."""

from __future__ import annotations

import getpass
import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("hyperlaunch", "torch", "megatron-core", "hydra-core", "omegaconf", "numpy",
            "boto3", "prometheus-client", "wandb", "nvidia-ml-py", "rich", "pyslurm")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: Path = PROJECT_ROOT) -> dict[str, object]:
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def build_manifest(argv: list[str], overrides: list[str]) -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    manifest = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [sys.executable, "-m", "launcher", *argv],
        "overrides": overrides,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "user": user,
        "project_root": str(PROJECT_ROOT),
        "git": git_state(),
        "packages": package_versions(),
    }
    return json.dumps(manifest, indent=2) + "\n"
