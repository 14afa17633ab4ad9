"""The tests' checkpoint hook: hold a process inside a named save phase so a test can act there.

Named by ``HYPERLAUNCH_CKPT_HOOK=ckpt_pause_hook:at_phase`` with this directory on PYTHONPATH
(:func:`pause_env` builds that environment). ``CKPT_TEST_PAUSE`` lists ``phase@step`` items
(``phase`` alone: every step), checked at import, so a malformed value fails at start-up. On
reaching a listed phase (once per phase and step and process) the process writes
``<CKPT_TEST_PAUSE_DIR>/<phase>@<step>.<pid>``, then waits until ``<dir>/release`` exists or
``CKPT_TEST_PAUSE_S`` seconds (default 60) pass, then writes ``<marker>.left``. A marker without
``.left`` proves the process was killed inside the phase; ``release`` lets a test end the pause
on a condition instead of a fixed sleep.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from checkpointing.hooks import ENV, PHASES

HERE = Path(__file__).resolve().parent
RELEASE = "release"


def _parse(spec: str) -> list[tuple[str, int | None]]:
    items = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        phase, sep, at = item.partition("@")
        if phase not in PHASES or (sep and not at.isdigit()):
            raise ValueError(f"CKPT_TEST_PAUSE item {item!r}: expected phase[@step] with phase in {', '.join(PHASES)}")
        items.append((phase, int(at) if sep else None))
    return items


_ARMED = _parse(os.environ.get("CKPT_TEST_PAUSE", ""))
_HOLD_S = float(os.environ.get("CKPT_TEST_PAUSE_S", "60"))
_fired: set[tuple[str, int]] = set()


def at_phase(phase: str, step: int) -> None:
    if (phase, step) in _fired or not any(p == phase and s in (None, step) for p, s in _ARMED):
        return
    _fired.add((phase, step))
    directory = Path(os.environ.get("CKPT_TEST_PAUSE_DIR", "."))
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{phase}@{step}.{os.getpid()}"
    marker.write_text(str(time.time()))
    deadline = time.monotonic() + _HOLD_S
    while time.monotonic() < deadline and not (directory / RELEASE).exists():
        time.sleep(0.01)
    marker.with_name(marker.name + ".left").write_text(str(time.time()))


def pause_env(spec: str, directory: Path, hold_s: float = 60) -> dict[str, str]:
    """The environment that arms this hook in a child process (trainer, torchrun ranks, replicator)."""
    root = HERE.parents[1]
    return {ENV: "ckpt_pause_hook:at_phase", "PYTHONPATH": f"{root}{os.pathsep}{HERE}", "CKPT_TEST_PAUSE": spec,
            "CKPT_TEST_PAUSE_DIR": str(directory), "CKPT_TEST_PAUSE_S": str(hold_s)}


def markers(directory: Path, phase: str = "*") -> list[Path]:
    """The pause markers written so far (not their ``.left`` companions)."""
    return sorted(p for p in directory.glob(f"{phase}@*") if not p.name.endswith(".left")) if directory.exists() else []


def left(marker: Path) -> bool:
    """True when the process left the phase (was not killed inside it)."""
    return marker.with_name(marker.name + ".left").exists()
