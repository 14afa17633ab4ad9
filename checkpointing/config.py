"""Typed checkpoint configuration (the ``checkpoint`` group) and its load-time checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

AddProblem = Callable[[str, object, str], None]


@dataclass
class CheckpointConfig:
    enabled: bool = False
    dir: Optional[str] = None  # default: <run dir>/checkpoints
    save_interval: int = 0  # steps; 0 = only the final save
    async_save: bool = True
    keep_last: int = 3


def check(cfg: CheckpointConfig, add: AddProblem) -> None:
    """Report every problem of this part through ``add(field, value, fix)``."""
    if cfg.save_interval < 0:
        add("checkpoint.save_interval", cfg.save_interval, "must be >= 0 (0 = final save only)")
    if cfg.keep_last <= 0:
        add("checkpoint.keep_last", cfg.keep_last, "must be >= 1")
