"""Progress for ``fsx preload``: a rich bar on a terminal, throttled plain lines otherwise
(Slurm logs, pipes), so a log file gets a handful of lines instead of carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class PreloadProgress(Protocol):
    def start(self, phase: str, total_files: int, total_bytes: int) -> None: ...

    def advance(self, phase: str, files: int, nbytes: int) -> None: ...

    def close(self) -> None: ...


class _Counts:
    def __init__(self, total_files: int, total_bytes: int) -> None:
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = 0

    def line(self, phase: str) -> str:
        return (f"preload: {phase} {self.files}/{self.total_files} files, "
                f"{human_bytes(self.bytes)}/{human_bytes(self.total_bytes)}")


class LineProgress:
    """One line per phase every ``interval_s`` at most, and always when a phase completes."""

    def __init__(self, out: TextIO, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.out, self.interval_s, self.clock = out, interval_s, clock
        self.phases: dict[str, _Counts] = {}
        self.last_print: dict[str, float] = {}

    def start(self, phase: str, total_files: int, total_bytes: int) -> None:
        self.phases[phase] = _Counts(total_files, total_bytes)
        self.last_print[phase] = self.clock()
        self._print(phase)

    def advance(self, phase: str, files: int, nbytes: int) -> None:
        counts = self.phases[phase]
        counts.files += files
        counts.bytes += nbytes
        now = self.clock()
        if counts.files >= counts.total_files or now - self.last_print[phase] >= self.interval_s:
            self.last_print[phase] = now
            self._print(phase)

    def _print(self, phase: str) -> None:
        print(self.phases[phase].line(phase), file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A live bar per phase (files as the bar, bytes alongside)."""

    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("files  {task.fields[bytes]}"), TimeElapsedColumn(),
                                 console=Console(file=out))
        self.tasks: dict[str, tuple[TaskID, _Counts]] = {}
        self.progress.start()

    def start(self, phase: str, total_files: int, total_bytes: int) -> None:
        counts = _Counts(total_files, total_bytes)
        task = self.progress.add_task(phase, total=total_files, bytes=self._bytes(counts))
        self.tasks[phase] = (task, counts)

    def advance(self, phase: str, files: int, nbytes: int) -> None:
        task, counts = self.tasks[phase]
        counts.files += files
        counts.bytes += nbytes
        self.progress.update(task, advance=files, bytes=self._bytes(counts))

    @staticmethod
    def _bytes(counts: _Counts) -> str:
        return f"{human_bytes(counts.bytes)}/{human_bytes(counts.total_bytes)}"

    def close(self) -> None:
        self.progress.stop()


def make_progress(out: TextIO | None = None) -> PreloadProgress:
    stream = out or sys.stdout
    return RichProgress(stream) if stream.isatty() else LineProgress(stream)
