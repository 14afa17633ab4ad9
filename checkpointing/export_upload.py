"""Upload an export to S3 next to the run's checkpoints: ``<prefix>/hf_export/step_XXXXXXXX/``."""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from checkpointing.manifest import FileEntry, crc32_combine, crc_hex, file_entry
from checkpointing.s3 import S3Location, b64_crc32, make_client
from checkpointing.store import step_name
from configs.checkpoint_config import S3Config

EXPORT_S3_DIR = "hf_export"


class UploadError(Exception):
    """An exported file did not arrive in S3 intact."""


def export_s3_prefix(s3: S3Config, step: int) -> str:
    """``<prefix>/hf_export/step_XXXXXXXX/`` (a key prefix, no bucket)."""
    return S3Location.of(s3).key(EXPORT_S3_DIR, step_name(step)) + "/"


def upload_export(export_dir: str, s3: S3Config, step: int, *, client: Any = None,
                  say: Callable[[str], None] = print) -> list[str]:
    """Upload every file of an export under :func:`export_s3_prefix`; returns the keys.

    Each object carries our CRC-32 (S3 checks it per PUT or part; the parts must add up to the
    file's CRC) and is verified by HEAD. ``config.json`` goes last: a reader that finds it finds
    a complete model.
    """
    loc = S3Location.of(s3)
    client = client or make_client(s3)
    part_size = s3.part_size_mb << 20
    names = sorted(os.listdir(export_dir), key=lambda n: (n == "config.json", n))
    prefix = export_s3_prefix(s3, step)
    t0, total = time.perf_counter(), 0
    keys = []
    with ThreadPoolExecutor(max_workers=s3.max_concurrency, thread_name_prefix="export-s3") as pool:
        for name in names:
            path = os.path.join(export_dir, name)
            if not os.path.isfile(path):
                continue
            entry = file_entry(path)
            key = prefix + name
            _upload_file(client, pool, loc.bucket, key, path, entry, part_size)
            head = client.head_object(Bucket=loc.bucket, Key=key)
            if head["ContentLength"] != entry.size or head.get("Metadata", {}).get("crc32") != entry.crc32:
                raise UploadError(f"{loc.url(key)}: {head['ContentLength']} bytes, crc32 "
                                  f"{head.get('Metadata', {}).get('crc32')}; the local file has {entry.size}, "
                                  f"{entry.crc32}")
            keys.append(key)
            total += entry.size
    say(f"export_hf: uploaded {len(keys)} files ({total / 2**20:.1f} MiB) to {loc.url(prefix)} in "
        f"{time.perf_counter() - t0:.1f} s")
    return keys


def _upload_file(client: Any, pool: ThreadPoolExecutor, bucket: str, key: str, path: str, entry: FileEntry,
                 part_size: int) -> None:
    meta = {"crc32": entry.crc32}
    if entry.size <= part_size:
        with open(path, "rb") as handle:
            data = handle.read()
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta, ChecksumCRC32=b64_crc32(zlib.crc32(data)))
        return
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta,
                                               ChecksumAlgorithm="CRC32")["UploadId"]

    def part(number: int) -> tuple[str, int, int]:
        offset = (number - 1) * part_size
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(min(part_size, entry.size - offset))
        crc = zlib.crc32(data)
        response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                      ChecksumCRC32=b64_crc32(crc))
        return response["ETag"], crc, len(data)

    try:
        results = list(pool.map(part, range(1, (entry.size + part_size - 1) // part_size + 1)))
        crc = 0
        for _, part_crc, size in results:
            crc = crc32_combine(crc, part_crc, size)
        if crc_hex(crc) != entry.crc32:
            raise UploadError(f"{path} changed while it was uploaded (crc32 {crc_hex(crc)}, was {entry.crc32})")
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": [
            {"PartNumber": n, "ETag": etag, "ChecksumCRC32": b64_crc32(part_crc)}
            for n, (etag, part_crc, _) in enumerate(results, start=1)]})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
