"""Typed monitoring configuration (the ``monitoring`` group) and its load-time checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

AddProblem = Callable[[str, object, str], None]


@dataclass
class MonitoringConfig:
    prometheus: bool = False
    wandb: bool = False
    wandb_project: Optional[str] = None


def check(cfg: MonitoringConfig, add: AddProblem) -> None:
    """Report every problem of this part through ``add(field, value, fix)``."""
    if cfg.wandb_project is not None and not cfg.wandb_project.strip():
        add("monitoring.wandb_project", cfg.wandb_project, "must not be empty; use null for the default")
