"""Fault-injection points for the tests: pause inside a named save phase so a test can kill there.

Inactive unless ``HYPERLAUNCH_CKPT_PAUSE`` is set (to ``phase@step`` items separated by commas,
``phase`` alone for every step). When a listed phase is reached, the process writes
``<HYPERLAUNCH_CKPT_PAUSE_DIR>/<phase>@<step>.<pid>`` and sleeps ``HYPERLAUNCH_CKPT_PAUSE_S``
seconds (default 60) so the test can SIGKILL it while it is provably inside that phase. Each
(phase, step) pauses at most once per process.

Phases: ``write_data`` (a data file half-written), ``manifest`` (all data written, manifest not
yet), ``rename`` (manifest written, directory not yet renamed), ``latest`` (renamed, pointer not
yet updated), ``upload_data`` (some parts of a data object uploaded), ``upload_manifest`` (data
objects verified in S3, manifest not uploaded), ``index`` (manifest uploaded, index not updated).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_fired: set[tuple[str, int]] = set()
PHASES = ("write_data", "manifest", "rename", "latest", "upload_data", "upload_manifest", "index")


def _armed(phase: str, step: int) -> bool:
    spec = os.environ.get("HYPERLAUNCH_CKPT_PAUSE")
    if not spec:
        return False
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == phase and (not at or int(at) == step):
            return True
    return False


def pause(phase: str, step: int) -> None:
    if (phase, step) in _fired or not _armed(phase, step):
        return
    _fired.add((phase, step))
    directory = Path(os.environ.get("HYPERLAUNCH_CKPT_PAUSE_DIR", "."))
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{phase}@{step}.{os.getpid()}"
    marker.write_text(str(time.time()))
    time.sleep(float(os.environ.get("HYPERLAUNCH_CKPT_PAUSE_S", "60")))
