"""Control files shared with the batch script (``$HYPERLAUNCH_CONTROL_DIR``).

The batch shell turns SIGUSR2 (``--signal``, time limit ahead) and SIGTERM into the file
``save_and_exit``; the ranks agree on it with one tiny all-reduce per step (so every rank
stops after the SAME step, never half of them inside a collective), save what they can,
and exit 0. A rank that receives the signal itself (local runs, scancel) calls
:func:`request_stop`, which joins the same agreement. ``finished`` tells the batch shell that
training is complete, so it does not requeue. File names match cluster.sbatch.SAVE_REQUEST / FINISHED_MARK.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.sbatch import FINISHED_MARK, SAVE_REQUEST

_stop_requested_here = False


def request_stop() -> None:
    """Ask for a stop from this process (e.g. a SIGTERM handler); every rank agrees at the next check."""
    global _stop_requested_here
    _stop_requested_here = True


def stop_was_requested() -> bool:
    return _stop_requested_here


def control_dir() -> Path | None:
    value = os.environ.get("HYPERLAUNCH_CONTROL_DIR")
    return Path(value) if value else None


def stop_requested(device: torch.device) -> bool:
    """True on every rank when any rank sees the request file."""
    directory = control_dir()
    seen = _stop_requested_here or bool(directory is not None and (directory / SAVE_REQUEST).exists())
    flag = torch.tensor([1.0 if seen else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def mark_finished() -> None:
    directory = control_dir()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / FINISHED_MARK).touch()
