"""End-to-end integrity of what goes to S3 and comes back, and "S3 is empty" vs "S3 cannot be read".

moto (5.2) stores whatever it is sent and verifies no checksum: it never answers BadDigest, not
for a part whose CRC does not match, nor for a full-object CRC that does not match the parts at
CompleteMultipartUpload (FINDINGS.md, section 1). It does compute the FULL_OBJECT CRC-32 of the
bytes it stored, which HEAD returns. So: S3's refusal is proven with botocore's Stubber (the
exact request the replicator sends, answered with BadDigest as real S3 does), and a part corrupted
in flight is proven against moto through the verification pass, which compares S3's CRC of the
stored bytes with the manifest's.
"""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import ANY, Stubber

from checkpointing.fetch import DownloadMismatch, fetch_newest, fetch_step
from checkpointing.journal import Journal
from checkpointing.replicate import ReplicationError, Replicator
from checkpointing.s3 import S3Location, b64_crc32, make_client
from checkpointing.store import CheckpointStore, StorageUnavailable
from s3_services import FaultProxy, MotoServer, free_port
from test_ckpt_replication import MiB, assert_in_s3, make_step, s3cfg

pytestmark = [pytest.mark.timeout(180)]


def crc_b64(data: bytes) -> str:
    return b64_crc32(zlib.crc32(data))


def test_every_object_carries_the_manifest_crc_as_its_full_object_checksum(tmp_path: Path, moto: MotoServer,
                                                                           bucket: str) -> None:
    step_dir = make_step(tmp_path / "ckpt", 10, {"big.distcp": 12 * MiB + 123, "small.pt": 999})
    cfg = s3cfg(bucket, moto.endpoint)
    Replicator(str(tmp_path / "ckpt"), cfg, say=lambda _l: None).replicate(10)
    head = moto.client().head_object(Bucket=bucket, Key=S3Location.of(cfg).step_key(10, "big.distcp"),
                                     ChecksumMode="ENABLED")
    assert head.get("ChecksumType") == "FULL_OBJECT"  # not COMPOSITE (a checksum of the parts' checksums)
    assert_in_s3(moto.client(), cfg, step_dir)


def test_s3_refusing_the_completed_object_aborts_the_upload(tmp_path: Path) -> None:
    """Real S3 answers BadDigest when the parts it holds do not add up to the full-object CRC sent
    at completion: the upload must be aborted and the object never journaled as verified."""
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 10, {"big.distcp": 6 * MiB + 7})
    data = (step_dir / "big.distcp").read_bytes()
    cfg = s3cfg("ckpt-stubbed", "http://127.0.0.1:9", max_concurrency=1, max_attempts=1)
    loc = S3Location.of(cfg)
    key = loc.step_key(10, "big.distcp")
    client = make_client(cfg)
    stub = Stubber(client)
    stub.add_response("create_multipart_upload", {"UploadId": "u-1", "Bucket": cfg.bucket, "Key": key},
                      {"Bucket": cfg.bucket, "Key": key, "Metadata": ANY, "ChecksumAlgorithm": "CRC32",
                       "ChecksumType": "FULL_OBJECT"})
    for number, part in ((1, data[:5 * MiB]), (2, data[5 * MiB:])):
        stub.add_response("upload_part", {"ETag": f'"e{number}"'},
                          {"Bucket": cfg.bucket, "Key": key, "UploadId": "u-1", "PartNumber": number, "Body": ANY,
                           "ChecksumCRC32": crc_b64(part)})
    stub.add_client_error("complete_multipart_upload", "BadDigest",
                          "The CRC32 you specified did not match the calculated checksum.", 400,
                          expected_params={"Bucket": cfg.bucket, "Key": key, "UploadId": "u-1",
                                           "ChecksumType": "FULL_OBJECT", "ChecksumCRC32": crc_b64(data),
                                           "MpuObjectSize": len(data), "MultipartUpload": ANY})
    stub.add_response("abort_multipart_upload", {}, {"Bucket": cfg.bucket, "Key": key, "UploadId": "u-1"})
    lines: list[str] = []
    with stub, pytest.raises(ReplicationError, match="S3 refused to complete the upload .*BadDigest"):
        Replicator(str(root), cfg, client=client, say=lines.append).replicate(10)
    stub.assert_no_pending_responses()  # aborted; and no manifest or index was written (no call left for them)
    journal = Journal(root / "replication" / "journal.jsonl")
    assert (10, "big.distcp") not in journal.verified and (10, "big.distcp") not in journal.uploads


class CorruptsOnePartInFlight:
    """A client that damages part 2 of the first multipart upload on its way out. The part's CRC is
    computed over the damaged bytes (memory damaged before the checksum), so only a check of the
    whole object can tell."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._lock = threading.Lock()
        self.corrupted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def upload_part(self, **kw: Any) -> Any:
        with self._lock:
            hit = kw["PartNumber"] == 2 and not self.corrupted
            self.corrupted += hit
        if hit:
            body = bytearray(kw["Body"])
            body[100] ^= 0xFF
            kw = {**kw, "Body": bytes(body), "ChecksumCRC32": crc_b64(bytes(body))}
        return self._inner.upload_part(**kw)


def test_a_part_corrupted_in_flight_is_found_and_uploaded_again(tmp_path: Path, moto: MotoServer,
                                                                bucket: str) -> None:
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 10, {"big.distcp": 12 * MiB + 5, "common.pt": 300})
    cfg = s3cfg(bucket, moto.endpoint)
    client = CorruptsOnePartInFlight(make_client(cfg))
    lines: list[str] = []
    Replicator(str(root), cfg, client=client, say=lines.append).replicate(10)
    assert client.corrupted == 1
    assert any("re-uploading 1 object(s) that failed verification: big.distcp" in ln for ln in lines), lines
    assert_in_s3(moto.client(), cfg, step_dir)  # downloaded: the bytes are the committed file's


def test_a_composite_upload_left_in_the_journal_is_aborted_not_resumed(tmp_path: Path, moto: MotoServer,
                                                                       bucket: str) -> None:
    """An upload journaled by an older replicator (COMPOSITE) cannot be completed as FULL_OBJECT."""
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 10, {"big.distcp": 11 * MiB})
    cfg = s3cfg(bucket, moto.endpoint)
    client, loc = moto.client(), S3Location.of(cfg)
    key = loc.step_key(10, "big.distcp")
    old = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
    part = (step_dir / "big.distcp").read_bytes()[:5 * MiB]
    client.upload_part(Bucket=bucket, Key=key, UploadId=old, PartNumber=1, Body=part, ChecksumCRC32=crc_b64(part))
    journal = Journal(root / "replication" / "journal.jsonl")
    journal.record("mpu", step=10, name="big.distcp", upload_id=old, part_size=5 * MiB)  # the old format
    lines: list[str] = []
    Replicator(str(root), cfg, say=lines.append).replicate(10)
    assert any("aborting the journaled upload" in ln and "COMPOSITE" in ln for ln in lines), lines
    assert_in_s3(client, cfg, step_dir)  # FULL_OBJECT CRC equal to the manifest's, no upload left open


def test_fetch_refuses_objects_that_do_not_match_the_manifest(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    root = tmp_path / "ckpt"
    cfg = s3cfg(bucket, moto.endpoint)
    replicator = Replicator(str(root), cfg, say=lambda _l: None)
    for step in (2, 4):
        make_step(root, step, {"__0_0.distcp": 7000, "common.pt": 50})
        replicator.replicate(step)
    loc = S3Location.of(cfg)
    moto.client().put_object(Bucket=bucket, Key=loc.step_key(4, "__0_0.distcp"), Body=os.urandom(7000))  # same size
    with pytest.raises(DownloadMismatch, match="__0_0.distcp: got"):
        fetch_step(str(tmp_path / "a"), cfg, 4, say=lambda _l: None)
    lines: list[str] = []
    fresh = CheckpointStore(str(tmp_path / "b"))
    valid = fetch_newest(fresh, cfg, lines.append, attempts=1)
    assert valid is not None and valid.step == 2  # the damaged step is skipped for the one before
    assert any("cannot use" in ln and "step_00000004" in ln for ln in lines), lines


def test_an_empty_bucket_is_no_checkpoint(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    lines: list[str] = []
    assert fetch_newest(CheckpointStore(str(tmp_path)), s3cfg(bucket, moto.endpoint), lines.append) is None
    assert any("starting from scratch" in ln for ln in lines), lines


def test_an_unreachable_endpoint_is_not_an_empty_one(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    lines: list[str] = []
    with pytest.raises(StorageUnavailable, match=f"cannot fetch a checkpoint .* at {endpoint}: EndpointConnection"):
        fetch_newest(CheckpointStore(str(tmp_path)), s3cfg("ckpt-gone", endpoint, max_attempts=1), lines.append,
                     attempts=2, backoff_s=0.1)
    assert sum("retrying in" in ln for ln in lines) == 1 and not any("scratch" in ln for ln in lines), lines


def test_s3_dying_during_the_download_is_not_a_damaged_step(tmp_path: Path) -> None:
    """The index and manifests were read, then the endpoint died: every step would look unusable."""
    server = MotoServer(tmp_path / "moto").start()
    try:
        server.client().create_bucket(Bucket="ckpt-dies")
        root = tmp_path / "ckpt"
        cfg = s3cfg("ckpt-dies", server.endpoint, max_attempts=2)
        replicator = Replicator(str(root), cfg, say=lambda _l: None)
        for step in (2, 4):
            make_step(root, step, {"__0_0.distcp": 9000})
            replicator.replicate(step)
        data = lambda method, path: "/step_" in path and not path.split("?")[0].endswith("manifest.json")  # noqa: E731
        with FaultProxy(server.port, cut_when=data, on_cut=server.kill) as proxy:
            fresh = CheckpointStore(str(tmp_path / "fresh"))
            with pytest.raises(StorageUnavailable, match=f"at {proxy.endpoint}"):
                fetch_newest(fresh, s3cfg("ckpt-dies", proxy.endpoint, max_attempts=2), lambda _l: None,
                             attempts=2, backoff_s=0.1)
            assert proxy.cut.is_set() and fresh.committed_steps() == []
    finally:
        server.kill()
