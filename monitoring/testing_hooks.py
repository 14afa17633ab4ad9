"""Test-only: synthetic checkpoint events, inert unless ``HYPERLAUNCH_TEST_FAKE_CHECKPOINTS`` is set.

The checkpoint code feeds real events through :func:`monitoring.record_checkpoint`; until it
does, the end-to-end tests need checkpoint series for the dashboard and the rules. Format:
``every=<steps>[,fail_replication_from=<step>]``.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from monitoring.events import CheckpointEvent, Operation

ENV = "HYPERLAUNCH_TEST_FAKE_CHECKPOINTS"


class FakeCheckpoints:
    def __init__(self, every: int, fail_replication_from: Optional[int]):
        self.every = every
        self.fail_replication_from = fail_replication_from

    @classmethod
    def from_env(cls) -> Optional["FakeCheckpoints"]:
        spec = os.environ.get(ENV)
        if not spec:
            return None
        fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        fail = fields.get("fail_replication_from")
        return cls(int(fields.get("every", "5")), int(fail) if fail else None)

    def on_step(self, step: int) -> None:
        from monitoring import record_checkpoint

        if step % self.every:
            return
        now = time.time()
        record_checkpoint(CheckpointEvent(Operation.BLOCKING, step, 0.08, size_bytes=None, timestamp=now))
        record_checkpoint(CheckpointEvent(Operation.SAVE, step, 0.9, size_bytes=3 << 30, timestamp=now))
        failing = self.fail_replication_from is not None and step >= self.fail_replication_from
        record_checkpoint(CheckpointEvent(Operation.REPLICATION, step, 4.2, ok=not failing, timestamp=now,
                                          error="S3 PutObject: SlowDown (503)" if failing else None))
