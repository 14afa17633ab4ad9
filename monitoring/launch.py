"""Launcher-side monitoring: extra files for a new run directory (scrape targets, endpoints)."""

from __future__ import annotations

from pathlib import Path

from launcher.schema import RootConfig


def run_files(root: RootConfig, run_dir: Path) -> dict[str, str]:
    """Files (name -> text) the monitoring setup adds to a new run directory."""
    return {}
