"""Monitoring: training, GPU (DCGM names) and EFA metrics for Prometheus, straggler detection, W&B alerts.

For other parts of the trainer (the checkpoint code) the API is :func:`record_checkpoint`::

    from monitoring import record_checkpoint
    record_checkpoint("blocking", step, seconds)           # training stalled this long for a save
    record_checkpoint("save", step, seconds, size_bytes=n)  # the whole save, async part included
    record_checkpoint("replication", step, seconds, ok=False, error="S3 PutObject: SlowDown")

It is thread-safe, never raises, and does nothing when monitoring is off. See docs/monitoring.md.
"""

from __future__ import annotations

import time
from typing import Optional, Union

from monitoring.events import CheckpointEvent, Operation

__all__ = ["record_checkpoint", "CheckpointEvent", "Operation"]


def record_checkpoint(operation: Union[str, Operation, CheckpointEvent], step: int = 0, seconds: float = 0.0, *,
                      ok: bool = True, size_bytes: Optional[int] = None, error: Optional[str] = None) -> None:
    """Feed one checkpoint operation (blocking | save | replication) to this process's monitoring."""
    from monitoring.training import active

    monitor = active()
    if monitor is None:
        return
    if isinstance(operation, CheckpointEvent):
        event = operation
    else:
        event = CheckpointEvent(Operation(operation), step, seconds, ok=ok, size_bytes=size_bytes, error=error,
                                timestamp=time.time())
    try:
        monitor.record_checkpoint(event)
    except Exception as exc:  # the checkpoint path must never fail because of monitoring
        print(f"monitoring: record_checkpoint failed: {type(exc).__name__}: {exc}", flush=True)
