"""The ``lfs`` HSM commands FSx for Lustre answers, behind one runner, plus the pure parsing.

What lfs does (lustre/utils/lfs.c), and why the calls look the way they do:

* ``lfs hsm_restore`` parses options with getopt and sends *one* request for all its files;
  if any file fails its checks (stat, regular file, same file system, FID lookup) nothing is
  requested. So a failed batch is retried file by file to find the bad one and still restore
  the rest.
* ``lfs hsm_state`` has no option parsing (a ``--`` would be read as a file name), prints
  ``<path>: (0x0000000d) released exists archived, archive_id:1`` per file in argument order
  and stops at the first file it cannot read.

Every path handed to lfs is absolute, so no file name can start with ``-``; ``hsm_restore``
also gets ``--``. Names with newlines, quotes or undecodable bytes are compared as bytes.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LFS_CALL_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class LfsResult:
    returncode: int
    stdout: bytes
    stderr: bytes


LfsRunner = Callable[[Sequence[str]], LfsResult]


@dataclass(frozen=True, slots=True)
class Failure:
    """One file (or the walk) that did not make it, and what lfs said."""

    path: str
    step: str
    message: str


def run_lfs(argv: Sequence[str]) -> LfsResult:
    """Run one lfs command as an argv list (never a shell); a timeout is a failed call."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=LFS_CALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return LfsResult(124, b"", f"no answer within {LFS_CALL_TIMEOUT_S:.0f} s".encode())
    except OSError as exc:  # lfs vanished or is not executable
        return LfsResult(127, b"", str(exc).encode())
    return LfsResult(proc.returncode, proc.stdout, proc.stderr)


def one_line(stderr: bytes, returncode: int, limit: int = 300) -> str:
    """lfs's stderr on one line (a file name in it may hold a newline)."""
    text = " ".join(stderr.decode("utf-8", "backslashreplace").split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return text or f"exit status {returncode}"


def restore(lfs: str, paths: Sequence[str], runner: LfsRunner = run_lfs) -> list[Failure]:
    """``lfs hsm_restore -- <paths>``; on failure, one call per file to name the bad ones."""
    result = runner([lfs, "hsm_restore", "--", *paths])
    if result.returncode == 0:
        return []
    if len(paths) == 1:
        return [Failure(paths[0], "hsm_restore", one_line(result.stderr, result.returncode))]
    return [failure for path in paths for failure in restore(lfs, [path], runner)]


def parse_hsm_state(stdout: bytes, paths: Sequence[str]) -> list[bool]:
    """``released`` for each leading path that ``lfs hsm_state`` reported, in order.

    The output is read by the names we passed, not split on newlines: a name may contain one.
    Parsing stops at the first path that is missing or malformed (lfs stopped there).
    """
    released: list[bool] = []
    pos = 0
    for path in paths:
        prefix = os.fsencode(path) + b": ("
        if not stdout.startswith(prefix, pos):
            break
        end = stdout.find(b"\n", pos + len(prefix))
        end = len(stdout) if end < 0 else end
        flags = stdout[pos + len(prefix):end].split(b",", 1)[0]  # "0x0000000d) released exists"
        released.append(b"released" in flags.split())
        pos = end + 1
    return released


def query_released(lfs: str, paths: Sequence[str],
                   runner: LfsRunner = run_lfs) -> tuple[dict[str, bool], list[Failure]]:
    """``lfs hsm_state`` for ``paths``: whether each is still released, and the unreadable ones."""
    states: dict[str, bool] = {}
    failures: list[Failure] = []
    todo = list(paths)
    while todo:
        result = runner([lfs, "hsm_state", *todo])
        flags = parse_hsm_state(result.stdout, todo)
        states.update(zip(todo, flags))
        if len(flags) == len(todo):
            break
        # lfs stopped at the first file it could not read: name it and go on after it.
        message = (one_line(result.stderr, result.returncode) if result.returncode != 0
                   else "unexpected `lfs hsm_state` output: " + result.stdout[:200].decode("utf-8", "backslashreplace"))
        failures.append(Failure(todo[len(flags)], "hsm_state", message))
        todo = todo[len(flags) + 1:]
    return states, failures
