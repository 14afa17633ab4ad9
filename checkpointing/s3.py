"""S3 for checkpoints: the one place that builds clients, names keys and reads/writes the index.

Key layout under ``s3://<bucket>/<prefix>/``::

    step_00000040/<every file of the step>    data objects, uploaded first
    step_00000040/manifest.json               uploaded last, after every data object verified
    index.json                                {"steps": {"40": {...}}, "latest": 40}

A step exists in S3 when its manifest does; ``index.json`` is the catalogue readers use to
find steps without listing (and is rebuilt from a listing when missing).
"""

from __future__ import annotations

import base64
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from configs.checkpoint_config import S3Config
from checkpointing.manifest import MANIFEST_NAME, Manifest, ManifestError
from checkpointing.store import parse_step_name, step_name

INDEX_NAME = "index.json"


def make_client(cfg: S3Config, *, pool: int = 0) -> Any:
    """A boto3 S3 client: credentials from the environment / instance profile only, botocore's
    standard retry mode (exponential back-off with jitter on 5xx, SlowDown, throttling and
    connection errors), a connection pool as large as the upload concurrency."""
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=cfg.region,
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, pool or cfg.max_concurrency + 4),
        connect_timeout=10,
        read_timeout=120,
        # our parts carry the CRC-32 we computed; S3 checks it on arrival
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, config=config)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def of(cls, cfg: S3Config) -> "S3Location":
        if not cfg.bucket:
            raise ValueError("checkpoint.s3.bucket is not set: there is no S3 location")
        return cls(cfg.bucket, cfg.prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def step_key(self, step: int, name: str = "") -> str:
        return self.key(step_name(step), name) if name else self.key(step_name(step)) + "/"

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key or self.key()}"


def b64_crc32(value: int) -> str:
    """S3's encoding of a CRC-32 checksum (base64 of the big-endian 4 bytes)."""
    return base64.b64encode(struct.pack(">I", value & 0xFFFFFFFF)).decode()


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line for logs: the S3 error code and message, or the exception."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return f"{err.get('Code', '?')} ({status}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload")


# --------------------------------------------------------------------------- index


@dataclass
class StepIndex:
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def latest(self) -> Optional[int]:
        return max(self.steps) if self.steps else None

    def to_json(self) -> str:
        return json.dumps({"format": 1, "latest": self.latest,
                           "steps": {str(k): v for k, v in sorted(self.steps.items())}}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "StepIndex":
        raw = json.loads(text)
        return cls({int(k): dict(v) for k, v in raw.get("steps", {}).items()})


def read_index(client: Any, loc: S3Location) -> StepIndex:
    """The index, rebuilt from the manifests present when it is missing or unreadable."""
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.key(INDEX_NAME))["Body"].read()
        return StepIndex.from_json(body.decode())
    except Exception as exc:
        if not is_missing(exc) and not isinstance(exc, (ValueError, KeyError)):
            raise
    return StepIndex({step: {"rebuilt": True} for step in list_manifest_steps(client, loc)})


def write_index(client: Any, loc: S3Location, index: StepIndex) -> None:
    client.put_object(Bucket=loc.bucket, Key=loc.key(INDEX_NAME), Body=index.to_json().encode(),
                      ContentType="application/json")


def index_entry(manifest: Manifest) -> dict[str, Any]:
    return {"files": len(manifest.files), "bytes": manifest.total_bytes, "consumed_samples": manifest.consumed_samples,
            "replicated_unix": round(time.time(), 3)}


def list_manifest_steps(client: Any, loc: S3Location) -> list[int]:
    """Steps whose manifest object exists, newest first (a listing: the index's fallback)."""
    steps = []
    paginator = client.get_paginator("list_objects_v2")
    base = loc.key() + "/" if loc.prefix else ""
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=base + "step_", Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            step = parse_step_name(common["Prefix"][len(base):].rstrip("/"))
            if step is not None:
                steps.append(step)
    present = []
    for step in steps:
        try:
            client.head_object(Bucket=loc.bucket, Key=loc.step_key(step, MANIFEST_NAME))
            present.append(step)
        except Exception as exc:
            if not is_missing(exc):
                raise
    return sorted(present, reverse=True)


def read_manifest(client: Any, loc: S3Location, step: int) -> Manifest:
    try:
        body = client.get_object(Bucket=loc.bucket, Key=loc.step_key(step, MANIFEST_NAME))["Body"].read()
    except Exception as exc:
        if is_missing(exc):
            raise ManifestError(f"{loc.url(loc.step_key(step, MANIFEST_NAME))} does not exist") from None
        raise
    manifest = Manifest.from_json(body.decode())
    if manifest.step != step:
        raise ManifestError(f"{loc.url(loc.step_key(step, MANIFEST_NAME))} names step {manifest.step}")
    return manifest
