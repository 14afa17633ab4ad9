"""Checkpoint and replication health for monitoring: two small JSON files in the checkpoint directory.

``<dir>/status.json`` is written by rank 0 after every save outcome, ``<dir>/replication/status.json``
by the S3 replicator. :func:`read_status` merges them; in the training process the callback's
``status()`` (``state.extra["checkpoint"].status()``) returns the same dictionary. Counters only
grow, so a monitoring sink can turn them into rates and alert on ``save_failures_total`` or
``replication.failures_total`` increasing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

SAVE_STATUS_NAME = "status.json"
REPLICATION_DIR = "replication"
REPLICATION_STATUS_NAME = "status.json"


@dataclass
class SaveStatus:
    last_committed_step: Optional[int] = None
    resumed_from_step: Optional[int] = None
    saves_total: int = 0
    save_failures_total: int = 0
    last_blocking_s: float = 0.0  # training time the last save took (planning + staging)
    waited_for_previous_s_total: float = 0.0  # time spent waiting for a save still in flight
    last_background_s: float = 0.0  # writing + commit, overlapped with training
    last_bytes: int = 0
    last_error: Optional[str] = None
    updated_unix: float = 0.0


@dataclass
class ReplicationStatus:
    state: str = "idle"  # idle | uploading | retrying | stopped
    step: Optional[int] = None  # the step being uploaded
    bytes_done: int = 0
    bytes_total: int = 0
    last_replicated_step: Optional[int] = None
    replicated_steps: list[int] = field(default_factory=list)
    failures_total: int = 0
    last_error: Optional[str] = None
    uploaded_bytes_total: int = 0
    attempt_started_unix: float = 0.0  # when the upload of ``step`` (this attempt) began
    last_duration_s: float = 0.0  # upload + verification + index of ``last_replicated_step``
    last_replicated_bytes: int = 0
    updated_unix: float = 0.0


def write_json_atomic(path: Path, body: dict[str, Any]) -> None:
    """Advisory files: replace atomically, never raise (monitoring must not break training)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def replication_status_path(checkpoint_dir: str) -> Path:
    return Path(checkpoint_dir, REPLICATION_DIR, REPLICATION_STATUS_NAME)


def read_replication_status(checkpoint_dir: str) -> Optional[ReplicationStatus]:
    try:
        raw = json.loads(replication_status_path(checkpoint_dir).read_text())
        return ReplicationStatus(**raw)
    except (OSError, ValueError, TypeError):
        return None


def read_save_status(checkpoint_dir: str) -> Optional[SaveStatus]:
    try:
        return SaveStatus(**json.loads(Path(checkpoint_dir, SAVE_STATUS_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_status(checkpoint_dir: str) -> dict[str, Any]:
    """``{"save": {...} | None, "replication": {...} | None}`` for a checkpoint directory."""
    save = read_save_status(checkpoint_dir)
    replication = read_replication_status(checkpoint_dir)
    return {"save": asdict(save) if save else None, "replication": asdict(replication) if replication else None}


@dataclass(frozen=True)
class ReplicationEvent:
    step: int
    seconds: float
    ok: bool
    size_bytes: Optional[int] = None
    error: Optional[str] = None


class ReplicationWatch:
    """Turns successive replicator status files into events: one per replicated step, one per failure.

    The replicator is another process; its status file is the interface (counters only grow).
    """

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        first = read_replication_status(checkpoint_dir)
        self._replicated = first.last_replicated_step if first else None
        self._failures = first.failures_total if first else 0
        self._mtime = 0.0

    def poll(self) -> list[ReplicationEvent]:
        path = replication_status_path(self.checkpoint_dir)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return []
        if mtime == self._mtime:
            return []
        self._mtime = mtime
        status = read_replication_status(self.checkpoint_dir)
        if status is None:
            return []
        events: list[ReplicationEvent] = []
        if status.failures_total > self._failures:
            seconds = max(0.0, status.updated_unix - status.attempt_started_unix) if status.attempt_started_unix else 0.0
            events.append(ReplicationEvent(step=status.step or status.last_replicated_step or 0, seconds=seconds,
                                           ok=False, error=status.last_error))
            self._failures = status.failures_total
        last = status.last_replicated_step
        if last is not None and last != self._replicated:
            events.append(ReplicationEvent(step=last, seconds=status.last_duration_s, ok=True,
                                           size_bytes=status.last_replicated_bytes or None))
            self._replicated = last
        return events
