"""Replicate committed checkpoints to S3 in the background, losing nothing across restarts.

For one step: every data object, each carrying the manifest's CRC-32 as S3's full-object
checksum (``ChecksumType=FULL_OBJECT``), so S3 itself refuses an object whose bytes are not the
committed file's: a single PUT up to one part; multipart above, every part with its own CRC-32
(checked on arrival), ``max_concurrency`` parts in flight (memory ``max_concurrency x
part_size``), completed with the whole file's CRC and size (``BadDigest``/``InvalidRequest``:
the upload is aborted and the step retried). Then a verification pass (HEAD: size and S3's
FULL_OBJECT CRC-32 equal to the manifest's, for every object), then ``manifest.json`` — last, so
a step is visible in S3 only when complete — then the index.

The journal (checkpointing.journal) records multipart uploads as they start and objects as they
verify, so a restarted replicator resumes half-uploaded files (ListParts) instead of starting
over, and aborts multipart uploads it started and no longer needs (and uploads journaled before
full-object checksums, which S3 would refuse to complete as FULL_OBJECT). Errors
never reach training: botocore retries each request (back-off on 5xx, SlowDown, connection
errors); a step that still fails is logged, counted in ``status.json`` and retried with a
growing pause.

Run by rank 0 of training as ``python -m checkpointing.replicate follow ...`` (a separate
process: no GIL shared with the training loop); usable by hand: ``once``, ``fetch``, ``list``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from checkpointing import hooks
from configs.checkpoint_config import S3Config
from checkpointing.fetch import DownloadMismatch, fetch_step
from checkpointing.journal import JOURNAL_NAME, Journal
from checkpointing.manifest import (MANIFEST_NAME, FileEntry, Manifest, ManifestError, crc32_combine, crc_hex,
                                    read_manifest)
from checkpointing.s3 import (S3Location, StepIndex, b64_crc32, describe, error_code, index_entry, is_missing,
                              make_client, read_index, write_index)
from checkpointing.status import (REPLICATION_DIR, ReplicationStatus, read_replication_status,
                                  replication_status_path, write_json_atomic)
from checkpointing.store import CheckpointStore, StorageUnavailable, parse_step_name, step_name

FULL_OBJECT = "FULL_OBJECT"
# CompleteMultipartUpload refusals meaning "what S3 assembled is not the committed file"
_REFUSED = ("BadDigest", "InvalidRequest", "InvalidPart")


class Stopped(Exception):
    """The replicator was asked to stop; the journal lets the next one continue."""


class ReplicationError(Exception):
    pass


# --------------------------------------------------------------------------- replicator


@dataclass(frozen=True)
class _Part:
    number: int
    offset: int
    size: int


class Replicator:
    """Uploads committed steps of one checkpoint directory to one S3 location."""

    def __init__(self, root: str, cfg: S3Config, *, keep_last_local: int = 0, client: Any = None,
                 say: Callable[[str], None] = print, progress_interval_s: float = 10.0):
        self.store = CheckpointStore(root)
        self.cfg = cfg
        self.loc = S3Location.of(cfg)
        self.client = client or make_client(cfg)
        self.part_size = cfg.part_size_mb << 20
        self.keep_last_local = keep_last_local  # 0: leave local retention to someone else
        self.say = say
        self.progress_interval_s = progress_interval_s
        self.stop = threading.Event()
        self.started_unix = time.time()
        self.journal = Journal(Path(root, REPLICATION_DIR, JOURNAL_NAME))
        previous = self.journal.start_for(self._journal_url())
        if previous is not None:  # checkpoint.s3 changed: what was verified THERE says nothing about here
            say(f"replicate: the journal was about {previous}; starting afresh for {self.loc.url()} (multipart "
                f"uploads still open at the old location are not aborted from here)")
        self.status = read_replication_status(root) or ReplicationStatus()
        self.status.state = "idle"
        self.status.step = None
        self._status_lock = threading.Lock()
        self._last_progress = 0.0
        self._index: Optional[StepIndex] = None

    def _journal_url(self) -> str:
        return f"{self.cfg.endpoint_url or 'aws'} {self.loc.url()}"

    # ------------------------------------------------------------------ public
    def index(self, refresh: bool = False) -> StepIndex:
        if self._index is None or refresh:
            self._index = read_index(self.client, self.loc)
            self.status.replicated_steps = sorted(self._index.steps)
            self.status.last_replicated_step = self._index.latest
        return self._index

    def pending_step(self) -> Optional[int]:
        """The newest committed local step, when S3 does not have it yet."""
        for step in self.store.committed_steps():
            try:
                self.store.validate(step, checksums=False)
            except ManifestError:
                continue
            return None if step in self.index().steps else step
        return None

    def replicate(self, step: int) -> None:
        """Upload, verify and index one committed step; raises on failure (after retries)."""
        path = self.store.path(step)
        try:
            manifest = read_manifest(path)
        except ManifestError as exc:
            raise ReplicationError(f"{path}: {exc}") from None
        self._abandon_other_steps(step)
        self._publish(state="uploading", step=step, bytes_done=0, bytes_total=manifest.total_bytes,
                      attempt_started_unix=time.time())
        t0 = time.perf_counter()
        self.say(f"replicate: {step_name(step)} -> {self.loc.url(self.loc.step_key(step))} "
                 f"({len(manifest.files)} files, {manifest.total_bytes / 2**20:.1f} MiB)")
        names = sorted(manifest.files, key=lambda n: -manifest.files[n].size)
        self._upload_files(step, path, manifest, names)
        bad = self._verify(step, manifest, names)
        if bad:  # lost or damaged in S3 (e.g. the server lost state): upload those again, once
            self.say(f"replicate: {step_name(step)}: re-uploading {len(bad)} object(s) that failed "
                     f"verification: {', '.join(bad[:3])}")
            for name in bad:
                self.journal.record("unverified", step=step, name=name)
            self._upload_files(step, path, manifest, bad)
            still = self._verify(step, manifest, bad)
            if still:
                raise ReplicationError(f"{step_name(step)}: objects still fail verification: {', '.join(still)}")
        hooks.at("upload_manifest", step)
        self._check_stop()
        manifest_path = Path(path, MANIFEST_NAME)
        body = manifest_path.read_bytes()
        self.client.put_object(Bucket=self.loc.bucket, Key=self.loc.step_key(step, MANIFEST_NAME), Body=body,
                               ChecksumAlgorithm="CRC32", ChecksumCRC32=b64_crc32(zlib.crc32(body)),
                               ContentType="application/json")
        hooks.at("index", step)
        index = self.index(refresh=True)
        index.steps[step] = index_entry(manifest)
        write_index(self.client, self.loc, index)
        elapsed = time.perf_counter() - t0
        self.status.uploaded_bytes_total += manifest.total_bytes
        self._publish(state="idle", step=None, bytes_done=manifest.total_bytes, last_replicated_step=index.latest,
                      replicated_steps=sorted(index.steps), last_error=None, last_duration_s=round(elapsed, 3),
                      last_replicated_bytes=manifest.total_bytes)
        self.say(f"replicate: {step_name(step)} replicated and verified: {manifest.total_bytes / 2**20:.1f} MiB in "
                 f"{elapsed:.1f} s ({manifest.total_bytes / 2**20 / max(elapsed, 1e-9):.0f} MiB/s)")
        self._retention(index)

    def abort_abandoned_uploads(self) -> int:
        """Abort multipart uploads under our prefix that no journal entry will resume."""
        mine = {u["upload_id"] for u in self.journal.uploads.values()}
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        prefix = self.loc.key() + "/" if self.loc.prefix else ""
        for page in paginator.paginate(Bucket=self.loc.bucket, Prefix=prefix + "step_"):
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                started_before_us = initiated is None or initiated.timestamp() <= self.started_unix + 1
                if upload["UploadId"] in mine or not started_before_us:
                    continue
                try:
                    self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    aborted += 1
                except Exception as exc:
                    if not is_missing(exc):
                        raise
        if aborted:
            self.say(f"replicate: aborted {aborted} abandoned multipart upload(s) under {self.loc.url()}")
        return aborted

    # ------------------------------------------------------------------ uploading
    def _upload_files(self, step: int, path: str, manifest: Manifest, names: list[str]) -> None:
        todo = [n for n in names if self.journal.verified.get((step, n)) != manifest.files[n].crc32]
        done_bytes = manifest.total_bytes - sum(manifest.files[n].size for n in todo)
        self._publish(bytes_done=done_bytes)
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency, thread_name_prefix="s3-part") as pool:
            for name in todo:  # files one after another, each file's parts in parallel
                self._check_stop()
                self._upload_file(pool, step, os.path.join(path, name), name, manifest.files[name])

    def _upload_file(self, pool: ThreadPoolExecutor, step: int, local: str, name: str, entry: FileEntry) -> None:
        key = self.loc.step_key(step, name)
        meta = {"crc32": entry.crc32, "step": str(step)}
        if entry.size <= self.part_size:
            with open(local, "rb") as handle:
                data = handle.read()
            if len(data) != entry.size or crc_hex(zlib.crc32(data)) != entry.crc32:
                raise ReplicationError(f"{local} no longer matches its manifest (local corruption)")
            # a single PUT's checksum is a full-object one; S3 refuses the PUT (BadDigest) on a mismatch
            self.client.put_object(Bucket=self.loc.bucket, Key=key, Body=data, Metadata=meta,
                                   ChecksumAlgorithm="CRC32", ChecksumCRC32=b64_crc32(zlib.crc32(data)))
            self._progress(len(data))
            self.journal.record("verified", step=step, name=name, crc32=entry.crc32)
            hooks.at("upload_data", step)  # tests: killed with some objects uploaded
            return
        parts = [_Part(i + 1, off, min(self.part_size, entry.size - off))
                 for i, off in enumerate(range(0, entry.size, self.part_size))]
        upload_id, have = self._open_upload(step, name, key, meta, parts)
        futures: dict[int, Future[tuple[str, int]]] = {}
        for part in parts:
            if part.number not in have:
                futures[part.number] = pool.submit(self._upload_part, step, local, key, upload_id, part)
            else:
                self._progress(part.size)
        results = dict(have)
        first_error: Optional[BaseException] = None
        for number, future in futures.items():
            try:
                results[number] = future.result()
            except BaseException as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        crc = 0
        for part in parts:
            crc = crc32_combine(crc, results[part.number][1], part.size)
        if crc_hex(crc) != entry.crc32:
            self._abort(step, name, key, upload_id)
            raise ReplicationError(f"{local}: the parts read add up to crc32 {crc_hex(crc)}, the manifest says "
                                   f"{entry.crc32} (the file changed after the commit)")
        try:  # S3 combines the parts' CRCs and refuses the object unless it is the manifest's CRC and size
            self.client.complete_multipart_upload(
                Bucket=self.loc.bucket, Key=key, UploadId=upload_id, ChecksumType=FULL_OBJECT,
                ChecksumCRC32=b64_crc32(int(entry.crc32, 16)), MpuObjectSize=entry.size,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": results[p.number][0],
                                            "ChecksumCRC32": b64_crc32(results[p.number][1])} for p in parts]})
        except Exception as exc:
            if error_code(exc) not in _REFUSED:
                raise  # e.g. the endpoint is gone: the journaled upload is resumed next time
            self._abort(step, name, key, upload_id)
            raise ReplicationError(f"{key}: S3 refused to complete the upload ({describe(exc)}): the parts it "
                                   f"holds are not the committed file (crc32 {entry.crc32}); aborted, the step "
                                   "is uploaded again") from None
        self.journal.record("mpu_done", step=step, name=name)
        self.journal.record("verified", step=step, name=name, crc32=entry.crc32)

    def _open_upload(self, step: int, name: str, key: str, meta: dict[str, str],
                     parts: list[_Part]) -> tuple[str, dict[int, tuple[str, int]]]:
        """A journaled upload to resume (with the parts S3 already has) or a new one."""
        known = self.journal.uploads.get((step, name))
        if known and known["part_size"] == self.part_size and known.get("checksum_type") == FULL_OBJECT:
            try:
                have = self._listed_parts(local_path(self.store, step, name), key, known["upload_id"], parts)
                if have:
                    self.say(f"replicate: resuming {key}: {len(have)}/{len(parts)} parts already in S3")
                return known["upload_id"], have
            except Exception as exc:
                if not is_missing(exc):
                    raise
                self.say(f"replicate: {key}: journaled multipart upload is gone ({describe(exc)}); starting over")
                self.journal.record("mpu_abort", step=step, name=name)
        elif known:  # another part size, or a COMPOSITE upload (S3 refuses to complete it as FULL_OBJECT)
            self.say(f"replicate: {key}: aborting the journaled upload (part size {known['part_size']}, checksum "
                     f"{known.get('checksum_type') or 'COMPOSITE'}); starting a {FULL_OBJECT} one")
            self._abort(step, name, key, known["upload_id"])
        upload = self.client.create_multipart_upload(Bucket=self.loc.bucket, Key=key, Metadata=meta,
                                                     ChecksumAlgorithm="CRC32", ChecksumType=FULL_OBJECT)
        self.journal.record("mpu", step=step, name=name, upload_id=upload["UploadId"], part_size=self.part_size,
                            checksum_type=FULL_OBJECT)
        return upload["UploadId"], {}

    def _listed_parts(self, local: str, key: str, upload_id: str, parts: list[_Part]) -> dict[int, tuple[str, int]]:
        """Parts S3 already has for an open upload: the right size and, where S3 reports a
        checksum, the CRC of our local bytes (others are uploaded again)."""
        by_number = {p.number: p for p in parts}
        have: dict[int, tuple[str, int]] = {}
        paginator = self.client.get_paginator("list_parts")
        with open(local, "rb") as handle:
            for page in paginator.paginate(Bucket=self.loc.bucket, Key=key, UploadId=upload_id):
                for listed in page.get("Parts", []):
                    part = by_number.get(listed["PartNumber"])
                    if part is None or listed["Size"] != part.size:
                        continue
                    handle.seek(part.offset)
                    crc = zlib.crc32(handle.read(part.size))
                    if listed.get("ChecksumCRC32") not in (None, b64_crc32(crc)):
                        continue
                    have[part.number] = (listed["ETag"], crc)
        return have

    def _upload_part(self, step: int, local: str, key: str, upload_id: str, part: _Part) -> tuple[str, int]:
        self._check_stop()
        with open(local, "rb") as handle:
            handle.seek(part.offset)
            data = handle.read(part.size)
        crc = zlib.crc32(data)
        response = self.client.upload_part(Bucket=self.loc.bucket, Key=key, UploadId=upload_id,
                                           PartNumber=part.number, Body=data, ChecksumCRC32=b64_crc32(crc))
        self._progress(part.size)
        if part.number == 2:
            hooks.at("upload_data", step)  # tests: killed with some parts uploaded
        return response["ETag"], crc

    def _abort(self, step: int, name: str, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            if not is_missing(exc):
                raise
        self.journal.record("mpu_abort", step=step, name=name)

    def _abandon_other_steps(self, step: int) -> None:
        """Open uploads of other steps will not be finished: a newer step supersedes them."""
        for (other, name), upload in list(self.journal.uploads.items()):
            if other != step:
                self._abort(other, name, self.loc.step_key(other, name), upload["upload_id"])

    # ------------------------------------------------------------------ verification
    def _verify(self, step: int, manifest: Manifest, names: list[str]) -> list[str]:
        """Names whose S3 object is missing or differs from the manifest, by what S3 computed: the
        size and the full-object CRC-32 of the bytes it stores (not metadata we wrote ourselves)."""
        bad = []
        for name in names:
            entry = manifest.files[name]
            try:
                head = self.client.head_object(Bucket=self.loc.bucket, Key=self.loc.step_key(step, name),
                                               ChecksumMode="ENABLED")
            except Exception as exc:
                if is_missing(exc):
                    bad.append(name)
                    continue
                raise
            # a COMPOSITE object's CRC is a checksum of checksums; a single PUT's may come without a type
            full_object = head.get("ChecksumType") in (FULL_OBJECT, None)
            if (head["ContentLength"] != entry.size or not full_object
                    or head.get("ChecksumCRC32") != b64_crc32(int(entry.crc32, 16))):
                self.say(f"replicate: {self.loc.url(self.loc.step_key(step, name))}: S3 has {head['ContentLength']} "
                         f"bytes, CRC-32 {head.get('ChecksumCRC32')} ({head.get('ChecksumType')}); the manifest says "
                         f"{entry.size} bytes, {b64_crc32(int(entry.crc32, 16))} (crc32 {entry.crc32})")
                bad.append(name)
        return bad

    # ------------------------------------------------------------------ retention
    def _retention(self, index: StepIndex) -> None:
        if self.keep_last_local:
            self.store.prune(self.keep_last_local, replicated=index.steps, say=self.say)
        self._remove_unindexed_steps(index)
        keep = self.cfg.keep_last
        if keep and len(index.steps) > keep:
            doomed = sorted(index.steps)[:-keep]
            for step in doomed:  # index first: readers never follow an entry to deleted objects
                index.steps.pop(step)
            write_index(self.client, self.loc, index)
            for step in doomed:
                self._delete_prefix(self.loc.step_key(step))
                self.journal.record("forget", step=step)
            self.say(f"replicate: removed {', '.join(step_name(s) for s in doomed)} from S3 (keep_last={keep})")
            self._publish(replicated_steps=sorted(index.steps))

    def _remove_unindexed_steps(self, index: StepIndex) -> None:
        """Step prefixes older than the newest indexed step that the index does not list: uploads
        abandoned by a killed replicator (data without manifest) or never indexed."""
        latest = index.latest
        if latest is None:
            return
        base = self.loc.key() + "/" if self.loc.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        stale = []
        for page in paginator.paginate(Bucket=self.loc.bucket, Prefix=base + "step_", Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                step = parse_step_name(common["Prefix"][len(base):].rstrip("/"))
                if step is not None and step < latest and step not in index.steps:
                    stale.append(step)
        for step in stale:
            self._delete_prefix(self.loc.step_key(step))
            self.journal.record("forget", step=step)
        if stale:
            self.say(f"replicate: removed incomplete/unindexed {', '.join(step_name(s) for s in stale)} from S3")

    def _delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.loc.bucket, Prefix=prefix):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            manifest = [o for o in objects if o["Key"].endswith("/" + MANIFEST_NAME)]
            rest = [o for o in objects if o not in manifest]
            for batch in (manifest, rest):  # the manifest first: a partial delete is not a step
                if batch:
                    self.client.delete_objects(Bucket=self.loc.bucket, Delete={"Objects": batch, "Quiet": True})

    # ------------------------------------------------------------------ status and progress
    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def _progress(self, nbytes: int) -> None:
        with self._status_lock:
            self.status.bytes_done += nbytes
            now = time.monotonic()
            if now - self._last_progress < self.progress_interval_s:
                return
            self._last_progress = now
            done, total = self.status.bytes_done, max(self.status.bytes_total, 1)
        self.say(f"replicate: {step_name(self.status.step or 0)} {100 * done / total:.0f}% "
                 f"({done / 2**20:.0f}/{total / 2**20:.0f} MiB)")
        self._publish()

    def _publish(self, **changes: Any) -> None:
        with self._status_lock:
            for key, value in changes.items():
                setattr(self.status, key, value)
            self.status.updated_unix = time.time()
            write_json_atomic(replication_status_path(self.store.root), asdict(self.status))

    def record_failure(self, exc: BaseException) -> None:
        self._publish(state="retrying", failures_total=self.status.failures_total + 1, last_error=describe(exc))

    # ------------------------------------------------------------------ follow loop
    def follow(self, commands: "CommandReader", retry_max_s: float = 60.0) -> int:
        """Replicate the newest committed step whenever S3 lacks it, until told to stop."""
        backoff = 1.0
        startup_done = False
        while True:
            if commands.eof.is_set():
                self._publish(state="stopped")
                return 0
            try:
                if not startup_done:
                    self.index(refresh=True)
                    self.abort_abandoned_uploads()
                    startup_done = True
                target = self.pending_step()
                if target is None:
                    if commands.drain.is_set():
                        self._publish(state="idle")
                        return 0
                    commands.wait(5.0)
                    continue
                self.replicate(target)
                backoff = 1.0
            except Stopped:
                self._publish(state="stopped")
                return 0
            except Exception as exc:
                self.record_failure(exc)
                self.say(f"replicate: attempt failed, retrying in {backoff:.0f} s: {describe(exc)}")
                commands.wait(backoff)
                backoff = min(backoff * 2, retry_max_s)


class CommandReader:
    """Reads ``commit N`` / ``drain`` lines from the trainer; end of input means stop."""

    def __init__(self, stream: Any, stop: threading.Event):
        self.eof = threading.Event()
        self.drain = threading.Event()
        self._wake = threading.Event()
        self._stop = stop
        thread = threading.Thread(target=self._read, args=(stream,), daemon=True, name="replicate-commands")
        thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            if line.strip() == "drain":
                self.drain.set()
            self._wake.set()
        self.eof.set()
        self._stop.set()
        self._wake.set()

    def wait(self, timeout: float) -> bool:
        """Sleep until a command arrives or ``timeout``; True when woken by a command."""
        woken = self._wake.wait(timeout)
        self._wake.clear()
        return woken


def local_path(store: CheckpointStore, step: int, name: str) -> str:
    return os.path.join(store.path(step), name)


# --------------------------------------------------------------------------- CLI


def _s3_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, help="the checkpoint directory (checkpoint.dir)")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="")
    parser.add_argument("--region", default=None)
    parser.add_argument("--endpoint-url", default=None)
    parser.add_argument("--max-concurrency", type=int, default=S3Config.max_concurrency)
    parser.add_argument("--part-size-mb", type=int, default=S3Config.part_size_mb)
    parser.add_argument("--max-attempts", type=int, default=S3Config.max_attempts)
    parser.add_argument("--keep-last-s3", type=int, default=0, help="replicated steps kept in S3 (0: all)")


def _config(args: argparse.Namespace) -> S3Config:
    return S3Config(bucket=args.bucket, prefix=args.prefix, region=args.region, endpoint_url=args.endpoint_url,
                    max_concurrency=args.max_concurrency, part_size_mb=args.part_size_mb,
                    max_attempts=args.max_attempts, keep_last=args.keep_last_s3)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpointing.replicate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    follow = sub.add_parser("follow", help="replicate new commits as they come (reads commands on stdin)")
    _s3_args(follow)
    follow.add_argument("--keep-last-local", type=int, default=0, help="local retention after each replication")
    once = sub.add_parser("once", help="replicate the newest committed step (or --step) and exit")
    _s3_args(once)
    once.add_argument("--step", type=int, default=None)
    fetch = sub.add_parser("fetch", help="download the newest replicated step (or --step) into --dir")
    _s3_args(fetch)
    fetch.add_argument("--step", type=int, default=None)
    listing = sub.add_parser("list", help="print the S3 index")
    _s3_args(listing)
    args = parser.parse_args(argv)
    cfg = _config(args)
    try:
        hooks.check()
    except hooks.HookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, cfg)
    except (ReplicationError, ManifestError, DownloadMismatch, StorageUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # botocore: credentials, endpoint, bucket — one line, no traceback
        if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer"):
            raise
        print(f"error: S3 ({S3Location.of(cfg).url()}): {describe(exc)}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, cfg: S3Config) -> int:
    def say(line: str) -> None:  # one write per line: rank 0 writes to the same file at the same time
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if args.command == "fetch":
        step = args.step if args.step is not None else read_index(make_client(cfg), S3Location.of(cfg)).latest
        if step is None:
            print(f"error: no replicated step under {S3Location.of(cfg).url()}", file=sys.stderr)
            return 1
        fetch_step(args.dir, cfg, step, say=say)
        return 0
    replicator = Replicator(args.dir, cfg, keep_last_local=getattr(args, "keep_last_local", 0), say=say,
                            progress_interval_s=2.0 if args.command == "once" else 10.0)
    if args.command == "list":
        print(replicator.index().to_json(), end="")
        return 0
    if args.command == "once":
        replicator.abort_abandoned_uploads()
        step = args.step if args.step is not None else replicator.pending_step()
        if step is None:
            say(f"replicate: nothing to do: S3 already has the newest committed step of {args.dir}")
            return 0
        replicator.replicate(step)
        return 0
    commands = CommandReader(sys.stdin, replicator.stop)
    return replicator.follow(commands)


if __name__ == "__main__":
    sys.exit(main())
