"""The replicator's journal: an append-only JSON-lines file that survives kills.

``<dir>/replication/journal.jsonl`` records multipart uploads as they start (upload id, part
size, checksum type) and objects as they verify, so a restarted replicator resumes half-uploaded
files (ListParts) instead of starting over, aborts uploads it no longer needs, and skips objects
already verified. A torn last line (killed mid-append) is dropped; the file is compacted when it
has grown well beyond what it describes. It is bound to one S3 location: entries about another
one are dropped.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional

JOURNAL_NAME = "journal.jsonl"


class Journal:
    """Append-only JSON lines; the replay gives open multipart uploads and verified objects."""

    def __init__(self, path: Path):
        self.path = path
        # (step, name) -> {"upload_id", "part_size", "checksum_type"}; checksum_type None: an upload
        # journaled before FULL_OBJECT checksums (COMPOSITE), which is aborted rather than resumed
        self.uploads: dict[tuple[int, str], dict[str, Any]] = {}
        self.verified: dict[tuple[int, str], str] = {}  # (step, name) -> crc32 of the verified object
        self.location: Optional[str] = None  # the S3 location these entries are about
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = 0
        if path.exists():
            raw = path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # a torn last line (killed mid-append): drop it
                raw = raw[: raw.rfind(b"\n") + 1]
                with open(path, "r+b") as handle:
                    handle.truncate(len(raw))
            for line in raw.decode(errors="replace").splitlines():
                lines += 1
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash
        if lines > 4 * (len(self.uploads) + len(self.verified)) + 1000:
            self._compact()

    def _apply(self, event: dict[str, Any]) -> None:
        key = (int(event.get("step", -1)), str(event.get("name", "")))
        kind = event["ev"]
        if kind == "location":
            self.location = str(event["url"])
        elif kind == "mpu":
            self.uploads[key] = {"upload_id": event["upload_id"], "part_size": int(event["part_size"]),
                                 "checksum_type": event.get("checksum_type")}
        elif kind in ("mpu_done", "mpu_abort"):
            self.uploads.pop(key, None)
        elif kind == "verified":
            self.verified[key] = event["crc32"]
        elif kind == "unverified":
            self.verified.pop(key, None)
        elif kind == "forget":  # the step is gone from S3 (retention) or was abandoned
            step = key[0]
            self.verified = {k: v for k, v in self.verified.items() if k[0] != step}
            self.uploads = {k: v for k, v in self.uploads.items() if k[0] != step}

    def record(self, ev: str, **fields: Any) -> None:
        event = {"ev": ev, **fields}
        with self._lock:
            self._apply(event)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(event) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def start_for(self, url: str) -> Optional[str]:
        """Bind the journal to one S3 location; entries about another one are dropped (returns it)."""
        previous = self.location
        if previous == url:
            return None
        if previous is None:  # a new journal, or one from before locations were recorded: adopt it
            self.record("location", url=url)
            return None
        with self._lock:
            self.uploads.clear()
            self.verified.clear()
            self.location = None
            self._compact()
        self.record("location", url=url)
        return previous

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            if self.location is not None:
                handle.write(json.dumps({"ev": "location", "url": self.location}) + "\n")
            for (step, name), upload in self.uploads.items():
                handle.write(json.dumps({"ev": "mpu", "step": step, "name": name, **upload}) + "\n")
            for (step, name), crc in self.verified.items():
                handle.write(json.dumps({"ev": "verified", "step": step, "name": name, "crc32": crc}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
