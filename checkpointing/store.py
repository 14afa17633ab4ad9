"""The checkpoint directory on the shared filesystem and its commit protocol.

Layout::

    <dir>/step_00000040/          committed: renamed into place after its manifest was written
    <dir>/step_00000050.tmp/      being written (or left by a crash: never loaded, removed later)
    <dir>/latest                  "step_00000040": the newest commit (a hint for people and tools)
    <dir>/replication/            the S3 replicator's journal and status

A step is committed by one atomic rename of ``step_N.tmp`` to ``step_N`` after every rank's
files and the manifest are on disk (fsynced), then ``latest`` is replaced atomically. Resume
trusts the directory scan and the manifests, not ``latest``: a crash between the rename and
the pointer update still resumes from the renamed step.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from checkpointing import hooks
from checkpointing.manifest import (Manifest, ManifestError, ManifestUnreadable, check_files, fsync_dir, read_manifest,
                                    write_manifest)

log = logging.getLogger(__name__)

LATEST_NAME = "latest"
TMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".deleting"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_ANY_STEP = re.compile(r"^step_(\d{8,})(\..+)?$")


class StorageUnavailable(RuntimeError):
    """Checkpoint storage (the shared filesystem or S3) could not be READ, which is not the same as
    holding no checkpoint: resuming must stop rather than start from scratch."""


RESUME_STOPPED = ("A checkpoint may be there, so the run stops here instead of training from step 0: run it again "
                  "(requeue) once the storage answers, or set checkpoint.resume=false to start over on purpose")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step_name(name: str) -> Optional[int]:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ValidStep:
    step: int
    path: str
    manifest: Manifest


class CheckpointStore:
    """One checkpoint directory (string paths: the same code serves every filesystem)."""

    def __init__(self, root: str):
        self.root = root

    def path(self, step: int) -> str:
        return os.path.join(self.root, step_name(step))

    def tmp_path(self, step: int) -> str:
        return self.path(step) + TMP_SUFFIX

    # ------------------------------------------------------------------ writing
    def prepare(self, step: int) -> str:
        """A fresh, empty ``step_N.tmp`` (a leftover from a crashed save is removed first)."""
        tmp = self.tmp_path(step)
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return tmp

    def commit(self, step: int, manifest: Manifest) -> str:
        """Manifest, fsync, atomic rename, ``latest``. Raises on any failure (nothing half-done is visible)."""
        tmp, final = self.tmp_path(step), self.path(step)
        hooks.at("manifest", step)
        write_manifest(tmp, manifest)
        hooks.at("rename", step)
        if os.path.lexists(final):  # the same step saved again (e.g. resumed at a saved step): replace it
            self._trash(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        hooks.at("latest", step)
        self.write_latest(step)
        return final

    def write_latest(self, step: int) -> None:
        tmp = os.path.join(self.root, f".{LATEST_NAME}.tmp")
        with open(tmp, "w") as handle:
            handle.write(step_name(step) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(self.root, LATEST_NAME))
        fsync_dir(self.root)

    def read_latest(self) -> Optional[int]:
        try:
            return parse_step_name(Path(self.root, LATEST_NAME).read_text().strip())
        except OSError:
            return None

    # ------------------------------------------------------------------ reading
    def committed_steps(self) -> list[int]:
        """Steps with a renamed (non-temporary) directory, newest first; manifests not checked.
        A missing directory holds none; one that cannot be listed (EIO, ESTALE, EACCES: a sick or
        unmounted filesystem) raises StorageUnavailable."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageUnavailable(f"cannot list the checkpoint directory {self.root}: {exc}") from None
        steps = [s for s in (parse_step_name(n) for n in names) if s is not None]
        return sorted(steps, reverse=True)

    def leftovers(self) -> list[str]:
        """Temporary and half-deleted step directories (crashed saves, interrupted deletions)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _ANY_STEP.match(n) and parse_step_name(n) is None)

    def validate(self, step: int, *, checksums: bool) -> ValidStep:
        """The step's manifest and files, or ManifestError saying what is wrong."""
        path = self.path(step)
        manifest = read_manifest(path)
        if manifest.step != step:
            raise ManifestError(f"manifest.json names step {manifest.step}")
        problems = check_files(path, manifest, checksums=checksums)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ManifestError("; ".join(problems[:3]) + more)
        return ValidStep(step, path, manifest)

    def newest_valid(self, *, checksums: bool = False, below: Optional[int] = None,
                     say: Callable[[str], None] = print) -> Optional[ValidStep]:
        """The newest step whose manifest and files check out; others are skipped with a line.
        A manifest that cannot be read (an I/O error, not a missing or bad file) raises
        StorageUnavailable: that step may well be good."""
        for step in self.committed_steps():
            if below is not None and step >= below:
                continue
            try:
                return self.validate(step, checksums=checksums)
            except ManifestUnreadable as exc:
                raise StorageUnavailable(f"cannot read {self.path(step)}: {exc}") from None
            except ManifestError as exc:
                say(f"checkpoint: skipping {self.path(step)}: {exc}")
        return None

    # ------------------------------------------------------------------ retention
    def prune(self, keep_last: int, replicated: Optional[Iterable[int]] = None,
              say: Callable[[str], None] = print) -> list[int]:
        """Delete committed steps beyond the newest ``keep_last``.

        A step goes only when a NEWER step is committed and (with replication) replicated, so
        there is always a durable copy to fall back on. ``replicated=None``: no replication.
        Returns the deleted steps.
        """
        try:
            steps = [s for s in self.committed_steps() if self._is_valid(s)]
        except StorageUnavailable as exc:  # a filesystem that cannot be read is never pruned
            say(f"checkpoint: retention skipped: {exc}")
            return []
        if len(steps) <= keep_last:
            return []
        if replicated is None:
            newest_safe = steps[0]
        else:
            done = set(replicated)
            safe = [s for s in steps if s in done]
            if not safe:
                return []
            newest_safe = safe[0]
        deleted = []
        for step in steps[keep_last:]:
            if step < newest_safe and self._trash(self.path(step)):
                deleted.append(step)
        if deleted:
            say(f"checkpoint: removed {', '.join(step_name(s) for s in sorted(deleted))} "
                f"(keep_last={keep_last}, newest safe copy {step_name(newest_safe)})")
        return deleted

    def _is_valid(self, step: int) -> bool:
        try:
            self.validate(step, checksums=False)
            return True
        except ManifestUnreadable as exc:
            raise StorageUnavailable(f"cannot read {self.path(step)}: {exc}") from None
        except ManifestError:
            return False

    def remove_leftovers(self, say: Callable[[str], None] = print) -> None:
        for name in self.leftovers():
            path = os.path.join(self.root, name)
            say(f"checkpoint: removing incomplete {path}")
            shutil.rmtree(path, ignore_errors=True)

    def _trash(self, path: str) -> bool:
        """Rename first (atomic, one winner when two processes prune), then delete."""
        trash = path + TRASH_SUFFIX
        if os.path.lexists(trash):  # an earlier deletion was interrupted
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("checkpoint: cannot remove %s: %s", path, exc)
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
