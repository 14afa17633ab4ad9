"""Preload a directory on FSx for Lustre from its linked S3 repository before training reads it.

Files imported through a data repository association start *released*: metadata only, the
bytes stay in S3 until first read, so the first epoch would stall on lazy loads. ``preload``
walks the tree, asks HSM to restore every regular file (``lfs hsm_restore``, in batches,
``jobs`` calls at a time) and with ``wait`` polls ``lfs hsm_state`` until no file is released.
Failures are collected and reported at the end; one bad file never stops the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TypeVar

from cluster.fsx_lfs import Failure, LfsRunner, query_released, restore, run_lfs
from cluster.fsx_progress import PreloadProgress

BATCH_ARG_BYTES = 64 * 1024  # argv bytes per lfs call, far below ARG_MAX
MAX_JOBS = 256
MAX_BATCH_FILES = 4096
MOUNTINFO = "/proc/self/mountinfo"


class PreloadError(Exception):
    """The preload cannot start (bad arguments, no lfs, not Lustre): exit status 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PreloadConfig:
    root: str
    """Directory on the FSx for Lustre mount; restored recursively."""
    jobs: int = 8
    """lfs processes running at once."""
    batch_files: int = 256
    """Files per lfs call (also capped at ``BATCH_ARG_BYTES`` of argv)."""
    lfs: str = "lfs"
    """The lfs program: a name looked up on PATH, or a path."""
    wait: bool = False
    """Poll ``lfs hsm_state`` until no file is released."""
    poll_interval_s: float = 10.0
    """Seconds between ``hsm_state`` rounds while waiting."""
    timeout_s: float = 0.0
    """Give up waiting after this many seconds (0: wait as long as it takes)."""
    check_mount: bool = True
    """Refuse a directory whose mount is not ``lustre`` in /proc/self/mountinfo."""


@dataclass(frozen=True, slots=True)
class LustreFile:
    path: str
    size: int


@dataclass(slots=True)
class PreloadReport:
    root: str
    files: int = 0
    bytes: int = 0
    requested: int = 0
    restored: int = 0
    waited: bool = False
    failures: list[Failure] = field(default_factory=list)
    other_mounts: list[str] = field(default_factory=list)


def lfs_missing_message(lfs: str) -> str:
    return (f"`{lfs}` (the Lustre client) is not installed or not on PATH, so this is not an FSx for Lustre "
            "client node; fix: run on a HyperPod node that mounts FSx, install the Lustre client "
            "(Ubuntu: apt-get install lustre-client-modules-$(uname -r); Amazon Linux 2: "
            "amazon-linux-extras install lustre) or pass --lfs /path/to/lfs")


def resolve_lfs(lfs: str) -> str:
    if os.sep in lfs:
        found = lfs if os.path.isfile(lfs) and os.access(lfs, os.X_OK) else None
    else:
        found = shutil.which(lfs)
    if found is None:
        raise PreloadError(lfs_missing_message(lfs))
    return os.path.abspath(found)


def validate(cfg: PreloadConfig) -> None:
    """All problems with ``cfg`` at once, each naming the flag, the value and the fix."""
    problems = []
    if not os.path.isdir(cfg.root):
        what = "does not exist" if not os.path.exists(cfg.root) else "is not a directory"
        problems.append(f"directory {cfg.root!r} {what}; pass the directory on the FSx mount to preload, "
                        "e.g. /fsx/data")
    if not 1 <= cfg.jobs <= MAX_JOBS:
        problems.append(f"--jobs {cfg.jobs}: must be between 1 and {MAX_JOBS}")
    if not 1 <= cfg.batch_files <= MAX_BATCH_FILES:
        problems.append(f"--batch-size {cfg.batch_files}: must be between 1 and {MAX_BATCH_FILES}")
    if not cfg.poll_interval_s > 0:
        problems.append(f"--poll-interval {cfg.poll_interval_s}: must be > 0 seconds")
    if not cfg.timeout_s >= 0:
        problems.append(f"--timeout {cfg.timeout_s}: must be >= 0 seconds (0 waits without limit)")
    if problems:
        raise PreloadError("; ".join(problems))


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) per line of /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" in fields[6:]:
            sep = fields.index("-", 6)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            mounts.append((point, fields[sep + 1]))
    return mounts


def mount_of(path: str, mounts: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """The mount holding ``path`` (an absolute, resolved path): the longest matching mount point."""
    best = ("/", "unknown")
    for point, fstype in mounts:  # later lines are later mounts, so they win ties
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def check_lustre(root: str, mountinfo: str = MOUNTINFO) -> None:
    try:
        with open(mountinfo, "rb") as f:
            text = os.fsdecode(f.read())
    except OSError:
        return  # not Linux: nothing to check against; lfs itself will complain
    point, fstype = mount_of(os.path.realpath(root), parse_mountinfo(text))
    if fstype != "lustre":
        raise PreloadError(f"{root!r} is on file system type {fstype} (mounted at {point}), not FSx for Lustre; "
                           "fix: pass a directory under the FSx mount (see `mount -t lustre`), "
                           "or --no-mount-check if mountinfo is wrong here")


def walk_files(root: str) -> tuple[list[LustreFile], list[Failure], list[str]]:
    """Regular files under ``root`` (no symlinks, not crossing into other mounts: lfs takes one
    file system per request); unreadable entries; directories skipped as other mounts."""
    root_dev = os.stat(root).st_dev
    files: list[LustreFile] = []
    failures: list[Failure] = []
    other_mounts: list[str] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            failures.append(Failure(directory, "walk", exc.strerror or str(exc)))
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                failures.append(Failure(entry.path, "walk", exc.strerror or str(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                (stack if st.st_dev == root_dev else other_mounts).append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                files.append(LustreFile(entry.path, st.st_size))
    return files, failures, other_mounts


def plan_batches(files: Sequence[LustreFile], max_files: int,
                 max_bytes: int = BATCH_ARG_BYTES) -> list[list[LustreFile]]:
    """Consecutive batches of at most ``max_files`` files and ``max_bytes`` of argv each."""
    batches: list[list[LustreFile]] = []
    current: list[LustreFile] = []
    size = 0
    for item in files:
        cost = len(os.fsencode(item.path)) + 1
        if current and (len(current) >= max_files or size + cost > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += cost
    if current:
        batches.append(current)
    return batches


T = TypeVar("T")
R = TypeVar("R")


def parallel(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> Iterator[tuple[T, R]]:
    """``fn`` over ``items`` with at most ``jobs`` running at once, in completion order.
    If the consumer stops (Ctrl-C, an error), queued items are cancelled, not run."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(fn, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def preload(cfg: PreloadConfig, make_progress: Callable[[], PreloadProgress], runner: LfsRunner = run_lfs,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> PreloadReport:
    """Restore every file under ``cfg.root``; raises ``PreloadError`` before touching anything."""
    validate(cfg)
    lfs = resolve_lfs(cfg.lfs)
    root = os.path.abspath(cfg.root)
    if cfg.check_mount:
        check_lustre(root)
    files, failures, other_mounts = walk_files(root)
    report = PreloadReport(root=root, files=len(files), bytes=sum(f.size for f in files),
                           failures=failures, other_mounts=other_mounts)
    progress = make_progress()
    try:
        failed = _request_restores(lfs, files, cfg, progress, runner, report)
        if cfg.wait:
            report.waited = True
            pending = [f for f in files if f.path not in failed]
            _wait_restored(lfs, pending, cfg, progress, runner, report, sleep, clock)
    finally:
        progress.close()
    return report


def _request_restores(lfs: str, files: Sequence[LustreFile], cfg: PreloadConfig, progress: PreloadProgress,
                      runner: LfsRunner, report: PreloadReport) -> set[str]:
    progress.start("requested", len(files), report.bytes)
    failed: set[str] = set()

    def request(batch: list[LustreFile]) -> list[Failure]:
        return restore(lfs, [f.path for f in batch], runner)

    for batch, batch_failures in parallel(request, plan_batches(files, cfg.batch_files), cfg.jobs):
        failed.update(f.path for f in batch_failures)
        report.failures.extend(batch_failures)
        ok = [f for f in batch if f.path not in failed]
        report.requested += len(ok)
        progress.advance("requested", len(batch), sum(f.size for f in batch))
    return failed


def _wait_restored(lfs: str, pending: list[LustreFile], cfg: PreloadConfig, progress: PreloadProgress,
                   runner: LfsRunner, report: PreloadReport,
                   sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
    progress.start("restored", len(pending), sum(f.size for f in pending))
    deadline = clock() + cfg.timeout_s if cfg.timeout_s > 0 else None

    def state(batch: list[LustreFile]) -> tuple[dict[str, bool], list[Failure]]:
        return query_released(lfs, [f.path for f in batch], runner)

    while pending:
        still: list[LustreFile] = []
        for batch, (released, state_failures) in parallel(state, plan_batches(pending, cfg.batch_files), cfg.jobs):
            report.failures.extend(state_failures)
            done = [f for f in batch if released.get(f.path) is False]
            still.extend(f for f in batch if released.get(f.path) is True)
            report.restored += len(done)
            progress.advance("restored", len(done) + len(state_failures),
                             sum(f.size for f in done))
        pending = still
        if pending and deadline is not None and clock() >= deadline:
            report.failures.extend(Failure(f.path, "wait", f"still released after {cfg.timeout_s:g} s")
                                   for f in pending)
            return
        if pending:
            sleep(cfg.poll_interval_s if deadline is None else max(0.0, min(cfg.poll_interval_s, deadline - clock())))
