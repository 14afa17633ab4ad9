"""cluster.local.process_alive: a running process is alive, an exited one that was not reaped yet
(a zombie: kill(0) still succeeds on it) is not, and a reaped one is not."""

from __future__ import annotations

import subprocess
import time

from cluster.local import process_alive


def test_running_zombie_and_reaped_processes() -> None:
    proc = subprocess.Popen(["sleep", "0.3"])
    assert process_alive(proc.pid)
    deadline = time.monotonic() + 10
    while process_alive(proc.pid):  # exits after 0.3 s and stays a zombie until wait()
        assert time.monotonic() < deadline, "an exited, unreaped process still counts as alive"
        time.sleep(0.05)
    assert proc.poll() == 0  # reaped now
    assert not process_alive(proc.pid)
