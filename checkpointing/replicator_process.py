"""Rank 0's handle on the S3 replicator process (``python -m checkpointing.replicate follow``).

A separate process so uploads share no GIL with the training loop and cannot crash it. Rank 0
writes ``commit N`` after each commit and ``drain`` at the end; closing the pipe (including
rank 0 dying) tells the replicator to stop; its journal lets the next run continue. A
replicator that exits unexpectedly is reported and restarted (a few times).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable, Optional

from configs.checkpoint_config import CheckpointConfig
from checkpointing.status import ReplicationStatus, read_replication_status

MAX_RESTARTS = 5


class ReplicatorProcess:
    def __init__(self, root: str, cfg: CheckpointConfig, say: Callable[[str], None]):
        self.root = root
        self.cfg = cfg
        self.say = say
        self.restarts = 0
        self._proc: Optional[subprocess.Popen[str]] = None
        self._start()

    def _command(self) -> list[str]:
        s3 = self.cfg.s3
        cmd = [sys.executable, "-m", "checkpointing.replicate", "follow", "--dir", self.root, "--bucket", str(s3.bucket),
               "--prefix", s3.prefix, "--max-concurrency", str(s3.max_concurrency), "--part-size-mb",
               str(s3.part_size_mb), "--max-attempts", str(s3.max_attempts), "--keep-last-s3", str(s3.keep_last),
               "--keep-last-local", str(self.cfg.keep_last)]
        if s3.region:
            cmd += ["--region", s3.region]
        if s3.endpoint_url:
            cmd += ["--endpoint-url", s3.endpoint_url]
        return cmd

    def _start(self) -> None:
        root_of_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root_of_repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # stdout/stderr are rank 0's: progress and errors land in the job log
        self._proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, text=True, env=env)

    def _alive(self) -> bool:
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        code = self._proc.returncode
        if self.restarts < MAX_RESTARTS:
            self.restarts += 1
            self.say(f"checkpoint: the S3 replicator exited with status {code}; restarting it "
                     f"({self.restarts}/{MAX_RESTARTS})")
            self._start()
            return True
        self.say(f"checkpoint: the S3 replicator exited with status {code} again; replication is OFF for this run "
                 f"(checkpoints stay on the shared filesystem; `python -m checkpointing.replicate once` uploads them)")
        self._proc = None
        return False

    def _send(self, line: str) -> None:
        if not self._alive() or self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # noticed (and restarted) at the next _alive()

    def committed(self, step: int) -> None:
        self._send(f"commit {step}")

    def status(self) -> Optional[ReplicationStatus]:
        return read_replication_status(self.root)

    def drain(self, timeout_s: float) -> bool:
        """Wait until S3 has the newest commit (or ``timeout_s``); then stop. True when drained."""
        self._send("drain")
        proc = self._proc
        if proc is None:
            return False
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        drained = proc.poll() == 0
        self.stop()
        return drained

    def stop(self, grace_s: float = 10.0) -> None:
        """Close the pipe: the replicator stops after the parts in flight (the journal keeps the rest)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
