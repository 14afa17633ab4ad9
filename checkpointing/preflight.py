"""Start-up checks, before any model is built: a bad checkpoint setting fails in seconds, by name.

Every rank checks that it can write the checkpoint directory (all nodes must share it; its parent
must exist, so an unmounted filesystem is never mistaken for an empty one) and that the fault-
injection hook, if one is set, loads; rank 0 checks S3 (credentials found and accepted, bucket
exists, prefix writable) and that the newest checkpoint it would resume from was saved by a model
of the same architecture and batch size. Storage that cannot be read raises StorageUnavailable
(stop and retry later), never "no checkpoint".
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from typing import Callable, Optional

from configs.checkpoint_config import CheckpointConfig, S3Config
from checkpointing.manifest import Manifest, ManifestError
from checkpointing import hooks
from checkpointing.store import RESUME_STOPPED, CheckpointStore, StorageUnavailable, step_name
from configs.schema import RootConfig
from configs.errors import ConfigError, Problem

# StorageUnavailable: re-exported for the entry point, which maps it to its own exit status
__all__ = ["RUN_DIR_ENV", "StorageUnavailable", "check_compatible", "check_writable", "checkpoint_root", "preflight"]

RUN_DIR_ENV = "HYPERLAUNCH_RUN_DIR"
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}


def checkpoint_root(cfg: CheckpointConfig) -> str:
    root = cfg.resolved_dir(os.environ.get(RUN_DIR_ENV))
    if root is None:
        raise ConfigError([Problem("checkpoint.dir", None, f"no run directory is known (${RUN_DIR_ENV} is unset): "
                                   "set checkpoint.dir to a directory on the shared filesystem")])
    return root


def preflight(cfg: RootConfig, rank: int) -> None:
    """Raise ConfigError naming every bad checkpoint setting this rank can see; StorageUnavailable when
    the checkpoint to resume cannot be looked for (the directory or S3 cannot be read)."""
    ck = cfg.checkpoint
    if not ck.enabled:
        return
    root = checkpoint_root(ck)
    problems: list[Problem] = []
    add = lambda f, v, fix: problems.append(Problem(f, v, fix))  # noqa: E731
    check_writable(root, add)
    try:
        hooks.check()
    except hooks.HookError as exc:
        add(hooks.ENV, os.environ.get(hooks.ENV), str(exc))
    if rank == 0 and not problems:
        if ck.replicated:
            check_s3(ck.s3, add)
        if ck.resume and not problems:
            try:
                found = newest_manifest(root, ck.s3 if ck.replicated else None)
            except StorageUnavailable as exc:
                raise StorageUnavailable(f"{exc}. {RESUME_STOPPED}") from None
            check_compatible(found, cfg, add)
    if problems:
        raise ConfigError(problems)


def check_writable(root: str, add: Callable[[str, object, str], None]) -> None:
    """Only the last component is ever created: a missing parent is a filesystem not mounted here."""
    host = socket.gethostname()
    probe = os.path.join(root, f".probe-{host}-{os.getpid()}")
    parent = os.path.dirname(os.path.abspath(root))
    if not os.path.lexists(parent):
        add("checkpoint.dir", root, f"its parent {parent} does not exist on {host}: is the shared filesystem "
            "mounted there? Mount it, or create the parent directory; the checkpoint directory is never created "
            "with its parents, so an unmounted filesystem is not mistaken for an empty one")
        return
    try:
        os.makedirs(root, exist_ok=True)
        with open(probe, "w") as handle:
            handle.write("ok")
            handle.flush()
            os.fsync(handle.fileno())
        os.unlink(probe)
    except OSError as exc:
        add("checkpoint.dir", root, f"is not writable from {host}: {exc.strerror or exc}; choose a directory "
            "every node can write (on HyperPod: FSx for Lustre, e.g. /fsx/checkpoints/<run>)")


def check_s3(cfg: S3Config, add: Callable[[str, object, str], None]) -> None:
    """Credentials, bucket and write access, with few retries (a dead endpoint fails fast)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from checkpointing.s3 import S3Location, describe, error_code, make_client

    if boto3.session.Session().get_credentials() is None:
        add("checkpoint.s3.bucket", cfg.bucket, "no AWS credentials found: set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in the job environment (cluster.secret_env), or run with an "
            "instance role; credentials never go in the config")
        return
    quick = dataclasses.replace(cfg, max_attempts=2)
    client = make_client(quick)
    loc = S3Location.of(cfg)
    where = f"at {cfg.endpoint_url}" if cfg.endpoint_url else f"in region {cfg.region or 'default'}"
    try:
        client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key() + "/", MaxKeys=1)
        probe = loc.key(f".hyperlaunch-probe-{uuid.uuid4().hex}")
        client.put_object(Bucket=loc.bucket, Key=probe, Body=b"ok")
        client.delete_object(Bucket=loc.bucket, Key=probe)
    except NoCredentialsError:
        add("checkpoint.s3.bucket", cfg.bucket, "no AWS credentials found (see AWS_PROFILE / instance role)")
    except ClientError as exc:
        code = error_code(exc)
        if code in ("NoSuchBucket", "404"):
            add("checkpoint.s3.bucket", cfg.bucket, f"does not exist {where}: create it or fix the name")
        elif code in _CREDENTIAL_CODES:
            add("checkpoint.s3.bucket", cfg.bucket, f"the AWS credentials from the environment were rejected "
                f"({describe(exc)}): fix AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or AWS_PROFILE")
        elif code in ("PermanentRedirect", "301", "AuthorizationQueryParametersError", "IllegalLocationConstraintException"):
            add("checkpoint.s3.region", cfg.region, f"bucket {cfg.bucket} is in another region ({describe(exc)})")
        elif code in ("AccessDenied", "403", "AllAccessDisabled"):
            add("checkpoint.s3.prefix", cfg.prefix, f"access denied writing s3://{cfg.bucket}/{loc.key()}/ "
                f"({describe(exc)}): grant s3:PutObject/GetObject/ListBucket/AbortMultipartUpload to the role")
        else:
            add("checkpoint.s3.bucket", cfg.bucket, f"S3 refused the access check: {describe(exc)}")
    except BotoCoreError as exc:
        add("checkpoint.s3.endpoint_url" if cfg.endpoint_url else "checkpoint.s3.region",
            cfg.endpoint_url or cfg.region, f"cannot reach S3 {where}: {exc}")


def newest_manifest(root: str, s3: Optional[S3Config]) -> Optional[tuple[str, Manifest]]:
    """(where, manifest) of the checkpoint a resume would start from, without reading data."""
    valid = CheckpointStore(root).newest_valid(checksums=False, say=lambda _line: None)
    if valid is not None:
        return valid.path, valid.manifest
    if s3 is None:
        return None
    from checkpointing.fetch import unavailable
    from checkpointing.s3 import S3Location, make_client, read_index, read_manifest

    client, loc = make_client(s3), S3Location.of(s3)
    try:
        for step in sorted(read_index(client, loc).steps, reverse=True):
            try:
                return loc.url(loc.step_key(step)), read_manifest(client, loc, step)
            except ManifestError:
                continue
    except Exception as exc:  # S3 answered the access check a moment ago: this is an outage, not "empty"
        raise unavailable(s3, "read the checkpoint index", exc) from None
    return None


def check_compatible(found: Optional[tuple[str, Manifest]], cfg: RootConfig,
                     add: Callable[[str, object, str], None]) -> None:
    """A resume needs the same architecture and global batch size (the data position is step x batch)."""
    from checkpointing.signature import model_mismatches, model_signature

    if found is None:
        return
    where, manifest = found
    where_step = f"{where} ({step_name(manifest.step)})"
    for key, saved, current in model_mismatches(manifest.model, model_signature(cfg.model)):
        name = "model.vocab_size" if key == "padded_vocab_size" else f"model.{key}"
        add(name, current, f"the checkpoint to resume, {where_step}, has {key}={saved}: resume with the same "
            f"architecture, or point checkpoint.dir at a new directory (or set checkpoint.resume=false) to start over")
    _check_optimizer_layout(manifest, cfg, where_step, add)
    saved_gbs = manifest.training.get("global_batch_size")
    if saved_gbs is not None and saved_gbs != cfg.training.global_batch_size:
        add("training.global_batch_size", cfg.training.global_batch_size,
            f"the checkpoint to resume, {where_step}, trained with {saved_gbs}: the data position is "
            "step x global batch size, so keep it (or start a new checkpoint.dir)")


def _check_optimizer_layout(manifest: Manifest, cfg: RootConfig, where_step: str,
                            add: Callable[[str, object, str], None]) -> None:
    """A ``dp_reshardable`` distributed-optimizer state loads only at the TP/PP/VPP that saved it."""
    saved = manifest.layout
    if manifest.optimizer_format != "dp_reshardable" or not saved.get("distributed_optimizer"):
        return
    from checkpointing.signature import layout_signature

    signature = layout_signature(cfg, 0, 0)  # world and DP sizes do not matter to this format
    current = {key: signature[key] for key in ("tp", "pp", "vpp", "distributed_optimizer")}
    for key, value in current.items():
        if saved.get(key) != value:
            layout = " ".join(f"parallelism.{k}={saved.get(k)}" for k in current)
            add(f"parallelism.{key}", value,
                f"the checkpoint to resume, {where_step}, is a periodic save whose optimizer state "
                f"(checkpoint.optimizer_format=dp_reshardable) loads only at {layout}: resume at that layout "
                "and stop the job (scancel or `python -m launcher cancel`: the stop save loads at any layout), "
                "or set checkpoint.optimizer_format=fully_reshardable for future runs")
            return
