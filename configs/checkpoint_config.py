"""Typed checkpoint configuration (the ``checkpoint`` group) and its load-time checks.

Credentials are never configuration: boto3 finds them in the environment, the shared
credentials file or the instance profile, like every AWS tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from configs.errors import AddProblem

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
OPTIMIZER_FORMATS = ("auto", "dp_reshardable", "fully_reshardable")
MIN_PART_MB = 5  # S3's smallest multipart part (except the last)
MAX_PART_MB = 5 * 1024
EXPORT_DTYPES = ("bf16", "fp16", "fp32")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int | None:
    """``5GB`` (10^9, as Hugging Face writes shard sizes), ``2GiB``, ``500MB`` or bytes; None when malformed."""
    match = _SIZE.match(str(text))
    if not match:
        return None
    unit = (match.group(2) or "").upper()
    if unit not in _UNITS:
        return None
    size = int(float(match.group(1)) * _UNITS[unit])
    return size if size > 0 else None


@dataclass
class S3Config:
    """Replication of committed checkpoints to S3; ``bucket: null`` turns it off."""

    bucket: Optional[str] = None  # bucket name only, e.g. my-training-ckpts
    prefix: str = ""  # key prefix for this run, e.g. runs/llama3_70b (no leading /)
    region: Optional[str] = None  # e.g. us-east-1; null: boto3's default chain
    endpoint_url: Optional[str] = None  # an S3-compatible server, e.g. http://127.0.0.1:9000
    max_concurrency: int = 8  # parts in flight at once
    part_size_mb: int = 64  # multipart part size (5..5120 MiB)
    max_attempts: int = 8  # botocore attempts per request (exponential back-off on 5xx/SlowDown)
    keep_last: int = 0  # replicated steps kept in S3; 0 keeps every one
    final_upload_timeout_s: int = 600  # at the end of training, wait this long for the last upload


@dataclass
class CheckpointConfig:
    enabled: bool = False
    dir: Optional[str] = None  # default: <run dir>/checkpoints (must be on a filesystem all nodes share)
    save_interval: int = 0  # steps; 0 = only the final save (and the save on a stop request)
    async_save: bool = True  # training blocks only while the state is staged to host memory
    keep_last: int = 3  # committed steps kept on the shared filesystem
    resume: bool = True  # continue from the newest committed step (the shared filesystem, else S3)
    verify_on_resume: bool = True  # check every file's checksum (spread over the ranks) before loading
    write_threads: int = 2  # files (and writer threads) per rank and save
    # distributed-optimizer state format: dp_reshardable is cheap to save (each rank writes its own
    # shard) but loads only at the same TP/PP/VPP; fully_reshardable loads at any layout but gathers
    # the whole optimizer state on every save. auto: periodic saves dp_reshardable, the final and
    # stop saves (synchronous anyway, and the ones a layout change resumes from) fully_reshardable
    optimizer_format: str = "auto"
    # weights-only start: a Hugging Face model directory, a checkpoint directory, a step directory
    # or a run directory of ours (its newest committed step). The run's own checkpoint wins on resume.
    init_from: Optional[str] = None
    export_hf: bool = False  # write <run dir>/hf_export (Hugging Face format) when training finishes
    export_dtype: str = "bf16"  # bf16 | fp16 | fp32
    export_max_shard_size: str = "5GB"
    s3: S3Config = field(default_factory=S3Config)

    @property
    def replicated(self) -> bool:
        return bool(self.enabled and self.s3.bucket)

    def resolved_dir(self, run_dir: Optional[str]) -> Optional[str]:
        """``dir``, else ``<run_dir>/checkpoints``; None when neither is known."""
        if self.dir:
            return self.dir
        return f"{run_dir.rstrip('/')}/checkpoints" if run_dir else None


def check(cfg: CheckpointConfig, add: AddProblem) -> None:
    """Report every problem of this part through ``add(field, value, fix)``."""
    if cfg.save_interval < 0:
        add("checkpoint.save_interval", cfg.save_interval, "must be >= 0 (0 = final save only)")
    if cfg.keep_last <= 0:
        add("checkpoint.keep_last", cfg.keep_last, "must be >= 1")
    if cfg.optimizer_format not in OPTIMIZER_FORMATS:
        add("checkpoint.optimizer_format", cfg.optimizer_format, f"must be one of {', '.join(OPTIMIZER_FORMATS)}")
    if not 1 <= cfg.write_threads <= 64:
        add("checkpoint.write_threads", cfg.write_threads, "must be between 1 and 64")
    if cfg.dir is not None:
        if not cfg.dir.strip():
            add("checkpoint.dir", cfg.dir, "must not be empty; use null for <run dir>/checkpoints")
        elif "://" in cfg.dir:
            add("checkpoint.dir", cfg.dir, "must be a path on the shared filesystem (e.g. /fsx/...); "
                "replicate to S3 with checkpoint.s3.bucket / checkpoint.s3.prefix")
    if cfg.init_from is not None and not str(cfg.init_from).strip():
        add("checkpoint.init_from", cfg.init_from, "must be a directory (a Hugging Face model, a checkpoint or "
            "run directory of ours), or null to start from random weights")
    if cfg.export_hf and not cfg.enabled:
        add("checkpoint.export_hf", True, "exports the final committed checkpoint: set checkpoint.enabled=true")
    if cfg.export_dtype not in EXPORT_DTYPES:
        add("checkpoint.export_dtype", cfg.export_dtype, f"must be one of {', '.join(EXPORT_DTYPES)}")
    if parse_size(cfg.export_max_shard_size) is None:
        add("checkpoint.export_max_shard_size", cfg.export_max_shard_size, "use a size like 5GB, 500MB or 2GiB")
    _check_s3(cfg, add)


def _check_s3(cfg: CheckpointConfig, add: AddProblem) -> None:
    s3 = cfg.s3
    if s3.bucket is None:
        return
    if not cfg.enabled:
        add("checkpoint.s3.bucket", s3.bucket, "replication needs checkpoints: set checkpoint.enabled=true "
            "or checkpoint.s3.bucket=null")
    if s3.bucket.startswith("s3://") or "/" in s3.bucket:
        add("checkpoint.s3.bucket", s3.bucket, "give the bucket name only (e.g. my-ckpts); "
            "put the path in checkpoint.s3.prefix")
    elif not _BUCKET.match(s3.bucket) or ".." in s3.bucket:
        add("checkpoint.s3.bucket", s3.bucket, "is not a valid S3 bucket name (3-63 characters: "
            "lowercase letters, digits, '.', '-')")
    prefix = s3.prefix
    if prefix and (prefix.startswith("/") or any(seg in ("", ".", "..") for seg in prefix.rstrip("/").split("/"))):
        add("checkpoint.s3.prefix", s3.prefix, "must be a relative key prefix like runs/llama3 "
            "(no leading '/', no empty, '.' or '..' segments)")
    if s3.region is not None and not _REGION.match(s3.region):
        add("checkpoint.s3.region", s3.region, "is not an AWS region name like us-east-1")
    if s3.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", s3.endpoint_url):
        add("checkpoint.s3.endpoint_url", s3.endpoint_url, "must be an http(s) URL, e.g. http://127.0.0.1:9000")
    if not 1 <= s3.max_concurrency <= 256:
        add("checkpoint.s3.max_concurrency", s3.max_concurrency, "must be between 1 and 256")
    if not MIN_PART_MB <= s3.part_size_mb <= MAX_PART_MB:
        add("checkpoint.s3.part_size_mb", s3.part_size_mb,
            f"must be between {MIN_PART_MB} and {MAX_PART_MB} (S3 multipart limits)")
    if s3.max_attempts < 1:
        add("checkpoint.s3.max_attempts", s3.max_attempts, "must be >= 1")
    if s3.keep_last < 0:
        add("checkpoint.s3.keep_last", s3.keep_last, "must be >= 0 (0 keeps every replicated step)")
    if s3.final_upload_timeout_s < 0:
        add("checkpoint.s3.final_upload_timeout_s", s3.final_upload_timeout_s, "must be >= 0")
