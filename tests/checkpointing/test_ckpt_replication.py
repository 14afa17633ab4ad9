"""S3 replication against a real S3 endpoint on loopback (moto's server), with failures injected:
the replicator killed mid-multipart, the S3 server killed mid-upload, 503 SlowDown storms."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from configs.checkpoint_config import S3Config
from checkpointing.fetch import fetch_step
from checkpointing.journal import Journal
from checkpointing.manifest import Manifest, file_entry
from checkpointing.replicate import Replicator
from checkpointing.s3 import S3Location, b64_crc32, read_index
from checkpointing.status import read_replication_status
from checkpointing.store import CheckpointStore, step_name
from ckpt_harness import ROOT
from ckpt_pause_hook import RELEASE, markers, pause_env
from s3_services import FaultProxy, MotoServer

faulthandler.enable()
pytestmark = [pytest.mark.timeout(180)]
MiB = 1 << 20


def make_step(root: Path, step: int, sizes: dict[str, int]) -> Path:
    store = CheckpointStore(str(root))
    tmp = Path(store.prepare(step))
    for name, size in sizes.items():
        (tmp / name).write_bytes(os.urandom(size))
    files = {name: file_entry(tmp / name) for name in sizes}
    manifest = Manifest(step=step, files=files, consumed_samples=step * 8, model={}, layout={})
    return Path(store.commit(step, manifest))


def s3cfg(bucket: str, endpoint: str, **kw: object) -> S3Config:
    base = dict(bucket=bucket, prefix="runs/test", endpoint_url=endpoint, part_size_mb=5, max_concurrency=4,
                max_attempts=4)
    base.update(kw)
    return S3Config(**base)  # type: ignore[arg-type]


def assert_in_s3(client: Any, cfg: S3Config, step_dir: Path) -> None:
    """Every object downloaded is byte for byte the committed local file, and S3's own full-object
    CRC-32 of it is the manifest's; the manifest is there; the index lists the step; no upload open."""
    loc = S3Location.of(cfg)
    manifest = Manifest.from_json((step_dir / "manifest.json").read_text())
    for name in [*manifest.files, "manifest.json"]:
        key = loc.step_key(manifest.step, name)
        assert client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read() == (step_dir / name).read_bytes(), name
    for name, entry in manifest.files.items():
        head = client.head_object(Bucket=cfg.bucket, Key=loc.step_key(manifest.step, name), ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32") == b64_crc32(int(entry.crc32, 16)), (name, head.get("ChecksumCRC32"))
        assert head.get("ChecksumType") in ("FULL_OBJECT", None), (name, head.get("ChecksumType"))
    assert manifest.step in read_index(client, loc).steps
    uploads = client.list_multipart_uploads(Bucket=cfg.bucket).get("Uploads", [])
    assert uploads == [], f"multipart uploads left open: {uploads}"


def assert_round_trip(tmp_path: Path, cfg: S3Config, step_dir: Path, step: int) -> None:
    """Download into a fresh directory: byte-identical to what was committed."""
    other = tmp_path / "fetched"
    fetch_step(str(other), cfg, step, say=lambda _l: None)
    for path in step_dir.iterdir():
        assert (other / step_name(step) / path.name).read_bytes() == path.read_bytes(), path.name


def replicator_cli(args: list[str], env: dict[str, str] | None = None, stdin: int | None = None,
                   log: Path | None = None) -> subprocess.Popen[str]:
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "checkpointing.replicate", *args], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdin=stdin,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def cli_args(mode: str, root: Path, cfg: S3Config) -> list[str]:
    return [mode, "--dir", str(root), "--bucket", str(cfg.bucket), "--prefix", cfg.prefix, "--endpoint-url",
            str(cfg.endpoint_url), "--part-size-mb", str(cfg.part_size_mb), "--max-concurrency",
            str(cfg.max_concurrency), "--max-attempts", str(cfg.max_attempts)]


def wait_marker(directory: Path, proc: subprocess.Popen[str], timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = markers(directory)
        if found:
            return found[0]
        assert proc.poll() is None, f"replicator exited early ({proc.returncode})"
        time.sleep(0.02)
    raise AssertionError("the pause marker never appeared")


def wait_text(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, (path.read_text() if path.exists() else "")[-3000:]
        time.sleep(0.05)


def test_multipart_replication_verifies_and_round_trips(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 10, {"__0_0.distcp": 12 * MiB + 123, "__1_0.distcp": 6 * MiB, "common.pt": 999})
    cfg = s3cfg(bucket, moto.endpoint)
    lines: list[str] = []
    Replicator(str(root), cfg, say=lines.append, progress_interval_s=0).replicate(10)
    client = moto.client()
    assert_in_s3(client, cfg, step_dir)
    assert any("replicated and verified" in ln for ln in lines) and any("%" in ln for ln in lines), lines
    status = read_replication_status(str(root))
    assert status is not None and status.last_replicated_step == 10 and status.failures_total == 0
    assert_round_trip(tmp_path, cfg, step_dir, 10)


def test_killed_replicator_resumes_its_multipart_upload(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 20, {"__0_0.distcp": 23 * MiB, "common.pt": 100})
    cfg = s3cfg(bucket, moto.endpoint, max_concurrency=2)
    client = moto.client()
    loc = S3Location.of(cfg)
    pauses = tmp_path / "pauses"
    proc = replicator_cli(cli_args("once", root, cfg), log=tmp_path / "first.log",
                          env=pause_env("upload_data@20", pauses))
    try:
        wait_marker(pauses, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    journal = Journal(root / "replication" / "journal.jsonl")
    assert (20, "__0_0.distcp") in journal.uploads  # the open upload is journaled
    open_ids = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]}
    assert journal.uploads[(20, "__0_0.distcp")]["upload_id"] in open_ids
    parts_before = client.list_parts(Bucket=bucket, Key=loc.step_key(20, "__0_0.distcp"),
                                      UploadId=journal.uploads[(20, "__0_0.distcp")]["upload_id"])["Parts"]
    assert len(parts_before) >= 2
    with pytest.raises(ClientError) as missing:  # no manifest yet: the step is not in S3
        client.head_object(Bucket=bucket, Key=loc.step_key(20, "manifest.json"))
    assert missing.value.response["Error"]["Code"] == "404"

    # an upload no journal knows about (a crash between CreateMultipartUpload and the journal line)
    stray = client.create_multipart_upload(Bucket=bucket, Key=loc.step_key(7, "__0_0.distcp"))
    again = replicator_cli(cli_args("once", root, cfg))
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out
    assert f"parts already in S3" in out and "aborted 1 abandoned multipart upload" in out, out
    assert stray["UploadId"] not in {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert_in_s3(client, cfg, step_dir)
    assert_round_trip(tmp_path, cfg, step_dir, 20)


def test_s3_server_killed_mid_upload_then_restarted(tmp_path: Path) -> None:
    server = MotoServer(tmp_path / "moto").start()
    try:
        server.client().create_bucket(Bucket="ckpt-restart")
        root = tmp_path / "ckpt"
        step_dir = make_step(root, 30, {"__0_0.distcp": 16 * MiB, "__0_1.distcp": 3 * MiB, "common.pt": 50})
        cfg = s3cfg("ckpt-restart", server.endpoint, max_attempts=2, max_concurrency=2)
        pauses = tmp_path / "pauses"
        log = tmp_path / "replicator.log"
        proc = replicator_cli(cli_args("follow", root, cfg), stdin=subprocess.PIPE, log=log,
                              env=pause_env("upload_data@30", pauses))
        try:
            wait_marker(pauses, proc)
            server.kill()  # mid-upload: the multipart upload has parts, the endpoint is gone
            (pauses / RELEASE).touch()
            wait_text(log, "attempt failed, retrying", proc)  # it failed, logged, and backs off
            server.start()  # in-memory: the bucket and every object are gone too
            server.client().create_bucket(Bucket="ckpt-restart")
            assert proc.stdin is not None
            proc.stdin.write("drain\n")
            proc.stdin.flush()
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = log.read_text()
        assert "attempt failed, retrying" in text, text
        assert "replicated and verified" in text, text
        status = read_replication_status(str(root))
        assert status is not None and status.failures_total >= 1 and status.last_replicated_step == 30, status
        assert_in_s3(server.client(), cfg, step_dir)
        assert_round_trip(tmp_path, cfg, step_dir, 30)
    finally:
        server.kill()


def test_503_slowdowns_are_retried_and_nothing_is_lost(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    root = tmp_path / "ckpt"
    step_dir = make_step(root, 40, {"__0_0.distcp": 14 * MiB, "__1_0.distcp": 7 * MiB, "common.pt": 10_000})
    with FaultProxy(moto.port, fraction=0.3, seed=7) as proxy:
        cfg = s3cfg(bucket, proxy.endpoint, max_attempts=12)
        lines: list[str] = []
        Replicator(str(root), cfg, say=lines.append).replicate(40)
        assert proxy.injected >= 3, (proxy.injected, proxy.forwarded)
    direct = s3cfg(bucket, moto.endpoint)
    assert_in_s3(moto.client(), direct, step_dir)
    assert_round_trip(tmp_path, direct, step_dir, 40)


def test_s3_retention_and_incomplete_step_cleanup(tmp_path: Path, moto: MotoServer, bucket: str) -> None:
    root = tmp_path / "ckpt"
    cfg = s3cfg(bucket, moto.endpoint, keep_last=2)
    client = moto.client()
    loc = S3Location.of(cfg)
    client.put_object(Bucket=bucket, Key=loc.step_key(3, "__0_0.distcp"), Body=b"orphan")  # no manifest
    replicator = Replicator(str(root), cfg, keep_last_local=1, say=lambda _l: None)
    for step in (2, 4, 6):
        make_step(root, step, {"__0_0.distcp": 1000 + step})
        replicator.replicate(step)
    index = read_index(client, loc)
    assert sorted(index.steps) == [4, 6]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=loc.key() + "/")["Contents"]]
    assert not any("step_00000002/" in k or "step_00000003/" in k for k in keys), keys
    assert CheckpointStore(str(root)).committed_steps() == [6]  # local: keep 1, the newest is replicated
    body = json.loads(client.get_object(Bucket=bucket, Key=loc.key("index.json"))["Body"].read())
    assert body["latest"] == 6
