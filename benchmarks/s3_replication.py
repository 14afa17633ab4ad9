"""S3 replication of a committed checkpoint vs a plain boto3 multipart upload of the same files.

    python benchmarks/s3_replication.py [--repeats 5] [--size-gb 0.6]

A real checkpoint is written first: the trainer's bf16 GPT with the distributed optimizer (see
checkpoint_async.py) saved synchronously by the real CheckpointWriter, so the file layout
(``.distcp`` files, ``common.pt``, ``.metadata``, ``metadata.json``, ``manifest.json``) is what
training commits. A real S3 endpoint, moto's server, runs on loopback (stopped by PID at the end).

Then, interleaved (ABBA) and each time to a fresh prefix:

* ours:  ``Replicator(root, S3Config(...)).replicate(step)``: parts with their CRC-32 and each
  object with the manifest's CRC-32 as its FULL_OBJECT checksum (S3 checks both), the journal, a
  HEAD verification pass, ``manifest.json`` last, the index read and written; all of that is
  inside the timed region, as it is what "replicated" means;
* plain: ``client.upload_file`` of every file of the step directory, one file after another, with
  ``TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=same)`` and a
  default boto3 client (boto3 >= 1.36 adds its own CRC-32 to every upload by default, so both
  sides checksum every byte; without it moto falls back to a full-object CRC64 and assembles each
  object in one bytearray, which makes "no checksum" slower on moto, not faster).

Both use ``S3Config``'s defaults (part size, concurrency) unless overridden. Throughput is the step
directory's bytes over wall seconds. Objects are deleted between runs, outside the timed region.
Client and server share this machine's cores: the absolute numbers are loopback numbers; the
ratio is what is compared. The last line is ``throughput_ratio=<ours/plain>`` (target >= 0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "checkpointing"))

from checkpoint_async import build_state, layers_for, log  # noqa: E402  (this directory)

STEP = 100
BUCKET = "ckpt-bench"


def write_checkpoint(root: str, size_gb: float) -> int:
    """Commit one step of a real training state with the real writer; returns its step number."""
    from trainer import cpu_compat, megatron_noise

    megatron_noise.silence()
    if cpu_compat.activate():
        megatron_noise.silence_cpu_only()
    from checkpointing.training import CheckpointCallback
    from trainer.distributed import shutdown

    state = build_state(layers_for(size_gb), root)
    callback = CheckpointCallback(state.cfg, state.layout)
    with contextlib.redirect_stdout(sys.stderr):
        callback.on_train_start(state)
        state.step = STEP
        outcome = callback._save(state, blocking=True, final=True)  # the trainer's own save path
    if callback.writer is not None:
        callback.writer.close()
    if outcome is None or not outcome.committed:
        raise RuntimeError(f"the checkpoint did not commit: {outcome}")
    del state
    shutdown()
    gc.collect()
    return STEP


def delete_prefix(client: Any, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": objects, "Quiet": True})


def run_ours(root: str, endpoint: str, prefix: str, part_mb: int, concurrency: int) -> float:
    from configs.checkpoint_config import S3Config
    from checkpointing.replicate import Replicator

    shutil.rmtree(Path(root, "replication"), ignore_errors=True)  # a fresh journal: nothing "already verified"
    cfg = S3Config(bucket=BUCKET, prefix=prefix, endpoint_url=endpoint, part_size_mb=part_mb,
                   max_concurrency=concurrency)
    replicator = Replicator(root, cfg, say=lambda _line: None)  # client made outside the timed region
    t0 = time.perf_counter()
    replicator.replicate(STEP)
    return time.perf_counter() - t0


def make_plain_client(endpoint: str, concurrency: int) -> Any:
    """boto3's defaults (CRC-32 on every upload since 1.36), with as many connections as ours."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=max(10, concurrency + 4))
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def run_plain(step_dir: Path, client: Any, prefix: str, part_mb: int, concurrency: int) -> float:
    from boto3.s3.transfer import TransferConfig

    part = part_mb << 20
    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency)
    files = sorted(step_dir.iterdir(), key=lambda p: -p.stat().st_size)
    t0 = time.perf_counter()
    for path in files:
        client.upload_file(str(path), BUCKET, f"{prefix}/{step_dir.name}/{path.name}", Config=transfer)
    return time.perf_counter() - t0


def main() -> int:
    from configs.checkpoint_config import S3Config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="uploads of each kind (alternating)")
    parser.add_argument("--size-gb", type=float, default=0.6, help="minimum checkpoint size, 10^9 bytes")
    parser.add_argument("--part-size-mb", type=int, default=S3Config.part_size_mb)
    parser.add_argument("--max-concurrency", type=int, default=S3Config.max_concurrency)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint directory goes")
    args = parser.parse_args()

    from s3_services import CREDENTIALS, MotoServer  # tests/checkpointing: the loopback S3 the tests use

    os.environ.update(CREDENTIALS)  # moto's dummy keys, never real ones
    os.environ.pop("AWS_PROFILE", None)
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent"
    work = Path(tempfile.mkdtemp(prefix="s3-bench-", dir=args.dir))
    server = MotoServer(work / "moto").start()
    try:
        root = str(work / "ckpt")
        t0 = time.perf_counter()
        write_checkpoint(root, args.size_gb)
        step_dir = Path(root, f"step_{STEP:08d}")
        files = sorted(step_dir.iterdir())
        nbytes = sum(p.stat().st_size for p in files)
        log(f"committed {step_dir.name}: {len(files)} files, {nbytes} bytes in {time.perf_counter() - t0:.1f} s")
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        plain_client = make_plain_client(server.endpoint, args.max_concurrency)
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for rep in range(args.repeats):
            for kind in (("ours", "plain") if rep % 2 == 0 else ("plain", "ours")):  # ABBA
                prefix = f"bench/{kind}-{rep}"
                if kind == "ours":
                    seconds = run_ours(root, server.endpoint, prefix, args.part_size_mb, args.max_concurrency)
                else:
                    seconds = run_plain(step_dir, plain_client, prefix, args.part_size_mb, args.max_concurrency)
                times[kind].append(seconds)
                listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{step_dir.name}/")
                if listed.get("KeyCount") != len(files):
                    raise RuntimeError(f"{kind}: {listed.get('KeyCount')} objects in S3, expected {len(files)}")
                delete_prefix(client, prefix)
                log(f"repeat {rep + 1}/{args.repeats} {kind:5s}: {seconds:.2f} s, "
                    f"{nbytes / seconds / 2**20:.0f} MiB/s")
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)

    print(f"checkpoint: {len(files)} files, {nbytes} bytes ({nbytes / 2**20:.0f} MiB); part {args.part_size_mb} MiB, "
          f"concurrency {args.max_concurrency}; moto server on loopback; {args.repeats} uploads each")
    print(f"{'':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'MiB/s (median)':>15s}")
    names = {"ours": "ours: Replicator.replicate (verified)", "plain": "plain: boto3 upload_file"}
    for kind, name in names.items():
        med = statistics.median(times[kind])
        print(f"{name:40s} {med:9.2f} {min(times[kind]):7.2f} {max(times[kind]):7.2f} {nbytes / med / 2**20:15.0f}")
    ratio = statistics.median(times["plain"]) / statistics.median(times["ours"])  # same bytes: inverse time ratio
    print(f"throughput_ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
