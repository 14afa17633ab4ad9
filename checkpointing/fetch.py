"""Download replicated steps from S3, telling "S3 has no usable checkpoint" from "S3 could not be read".

:func:`fetch_step` downloads one step into ``<dir>/step_N`` and checks every file against the
manifest (size and CRC-32) before committing it locally. :func:`fetch_newest` is what resume
uses: the newest replicated step that downloads intact. A step that is damaged or half-deleted in
S3 (manifest missing, an object missing or not matching the manifest) is skipped for the one
before it; any other failure (endpoint unreachable, 5xx after botocore's retries, access denied,
a local write error) is retried with back-off and then raised as StorageUnavailable, so an
outage never turns into a restart from step 0.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from checkpointing.manifest import ManifestError, ManifestUnreadable, file_entry
from checkpointing.s3 import S3Location, describe, is_missing, make_client, read_index, read_manifest
from checkpointing.store import CheckpointStore, StorageUnavailable, ValidStep, step_name
from configs.checkpoint_config import S3Config

FETCH_ATTEMPTS = 3  # whole fetches; each request is also retried by botocore (s3.max_attempts)
FETCH_BACKOFF_S = 5.0  # pause before the second attempt, doubled after each


class DownloadMismatch(Exception):
    """What S3 returned is not what the step's manifest describes."""


def where(cfg: S3Config) -> str:
    return cfg.endpoint_url or f"AWS S3 (region {cfg.region or 'from the environment'})"


def unavailable(cfg: S3Config, doing: str, exc: BaseException) -> StorageUnavailable:
    return StorageUnavailable(f"cannot {doing} from {S3Location.of(cfg).url()} at {where(cfg)}: {describe(exc)}")


def is_damaged_step(exc: BaseException) -> bool:
    """True for problems of the step itself in S3 (skip it), False for failures to read S3 (retry, then stop)."""
    if isinstance(exc, ManifestUnreadable):
        return False
    return isinstance(exc, (ManifestError, DownloadMismatch)) or is_missing(exc)


def fetch_step(root: str, cfg: S3Config, step: int, *, client: Any = None, say: Callable[[str], None] = print) -> str:
    """Download one replicated step into ``<root>/step_N`` (verified, then committed locally)."""
    client = client or make_client(cfg)
    loc = S3Location.of(cfg)
    manifest = read_manifest(client, loc, step)
    store = CheckpointStore(root)
    tmp = store.prepare(step)
    t0 = time.perf_counter()
    say(f"checkpoint: fetching {loc.url(loc.step_key(step))} ({len(manifest.files)} files, "
        f"{manifest.total_bytes / 2**20:.1f} MiB) into {store.path(step)}")
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(multipart_chunksize=cfg.part_size_mb << 20, max_concurrency=cfg.max_concurrency)

    def download(name: str) -> Optional[str]:
        dest = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        client.download_file(loc.bucket, loc.step_key(step, name), dest, Config=transfer)
        got = file_entry(dest)  # the bytes on disk against the manifest: size and CRC-32
        return None if got == manifest.files[name] else f"{name}: got {got}, manifest says {manifest.files[name]}"

    with ThreadPoolExecutor(max_workers=min(4, max(1, len(manifest.files)))) as pool:
        problems = [p for p in pool.map(download, sorted(manifest.files)) if p]
    if problems:
        raise DownloadMismatch(f"{loc.url(loc.step_key(step))} does not match its manifest: {'; '.join(problems[:3])}")
    store.commit(step, manifest)
    say(f"checkpoint: fetched {step_name(step)} from S3 in {time.perf_counter() - t0:.1f} s")
    return store.path(step)


def fetch_newest(store: CheckpointStore, cfg: S3Config, say: Callable[[str], None], *, client: Any = None,
                 attempts: int = FETCH_ATTEMPTS, backoff_s: float = FETCH_BACKOFF_S) -> Optional[ValidStep]:
    """The newest replicated step that downloads intact; None when S3 holds no usable step;
    StorageUnavailable when S3 could not be read ``attempts`` times in a row."""
    client = client or make_client(cfg)
    pause = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return _fetch_newest_once(store, cfg, client, say)
        except Exception as exc:
            if attempt == attempts:
                raise unavailable(cfg, f"fetch a checkpoint ({attempts} attempts)", exc) from None
            say(f"checkpoint: cannot read {S3Location.of(cfg).url()} at {where(cfg)}: {describe(exc)}; "
                f"retrying in {pause:.0f} s ({attempt}/{attempts})")
            time.sleep(pause)
            pause *= 2
    return None  # attempts < 1


def _fetch_newest_once(store: CheckpointStore, cfg: S3Config, client: Any,
                       say: Callable[[str], None]) -> Optional[ValidStep]:
    loc = S3Location.of(cfg)
    steps = sorted(read_index(client, loc).steps, reverse=True)
    if not steps:
        say(f"checkpoint: no checkpoint in {store.root} or {loc.url()}: starting from scratch")
        return None
    for step in steps:
        try:
            fetch_step(store.root, cfg, step, client=client, say=say)
            return store.validate(step, checksums=False)
        except Exception as exc:
            if not is_damaged_step(exc):
                raise
            say(f"checkpoint: cannot use {loc.url(loc.step_key(step))}: {exc}")
    say(f"checkpoint: no usable checkpoint in {store.root} or {loc.url()} (every replicated step is damaged): "
        "starting from scratch")
    return None
