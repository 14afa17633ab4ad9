"""S3 <-> FSx for Lustre data repository associations (DRAs): validation and pure rendering.

A DRA links a directory on the file system to an S3 prefix. Auto-import brings new, changed
and deleted S3 objects into the file system (as released files: see ``fsx preload``);
auto-export copies files written on FSx back to S3.

Auto-export is asynchronous and unordered across files: when ``latest`` or a manifest lands in
S3, the shards it names may not have. Checkpoints read back from an exported path must still be
validated through the manifest. The checkpointing package replicates to S3 itself, so the
checkpoint DRA defaults to import only: it exists to read checkpoints back, not to write them.
Export is off by default for training data too: an exported DELETED event deletes from S3.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

EVENTS = ("NEW", "CHANGED", "DELETED")
ALL_EVENTS = ",".join(EVENTS)
FILE_SYSTEM_ID = re.compile(r"fs-[0-9a-f]{8,17}")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
REGION = re.compile(r"[a-z]{2,}(-[a-z]+)+-\d+")
BAD_PATH_CHARS = re.compile("[\x00\r\n\x85\u2028\u2029]")  # what the FSx API rejects
MAX_FSX_PATH = 4096
MAX_S3_PATH = 4357
MAX_CHUNK_MIB = 512_000


class DraConfigError(Exception):
    """Invalid DRA flags; ``problems`` lists each one. Exit status 2."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid data repository association settings:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class DraOptions:
    """The ``fsx dra`` flags as typed, before validation."""

    file_system_id: str
    fsx_path: str
    s3: str
    checkpoint_fsx_path: str | None = None
    checkpoint_s3: str | None = None
    import_policy: str = ALL_EVENTS
    export_policy: str = "none"
    checkpoint_import_policy: str = ALL_EVENTS
    checkpoint_export_policy: str = "none"
    batch_import: bool = True
    imported_file_chunk_size: int | None = None
    region: str | None = None
    endpoint_url: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Association:
    role: str
    fsx_path: str
    s3_path: str
    import_events: tuple[str, ...]
    export_events: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DraPlan:
    file_system_id: str
    associations: tuple[Association, ...]
    batch_import: bool
    imported_file_chunk_size: int | None
    region: str | None
    endpoint_url: str | None


def _parse_events(flag: str, value: str, problems: list[str]) -> tuple[str, ...]:
    names = [n.strip().upper() for n in value.split(",") if n.strip()]
    if names in ([], ["NONE"]):
        return ()
    unknown = [n for n in names if n not in EVENTS]
    if unknown:
        problems.append(f"{flag} {value!r}: unknown event {', '.join(unknown)}; use a comma list of "
                        f"{', '.join(EVENTS)} (e.g. {ALL_EVENTS}) or 'none'")
    return tuple(e for e in EVENTS if e in names)


def _check_fsx_path(flag: str, path: str, problems: list[str]) -> None:
    if not path.startswith("/"):
        problems.append(f"{flag} {path!r}: must be an absolute path on the file system, e.g. /data")
    elif BAD_PATH_CHARS.search(path) or not _encodable(path) or len(path) > MAX_FSX_PATH:
        problems.append(f"{flag} {path!r}: must be valid UTF-8 without NUL or line breaks, "
                        f"at most {MAX_FSX_PATH} characters")
    elif any(part in ("", ".", "..") for part in path.strip("/").split("/")) and path != "/":
        problems.append(f"{flag} {path!r}: no empty, '.' or '..' components; write it as "
                        f"{'/' + '/'.join(p for p in path.split('/') if p not in ('', '.'))!r}")


def _check_s3(flag: str, url: str, problems: list[str]) -> None:
    match = re.fullmatch(r"s3://([^/]*)(/.*)?", url, flags=re.DOTALL)
    if match is None:
        problems.append(f"{flag} {url!r}: must be s3://bucket or s3://bucket/prefix/")
        return
    bucket, prefix = match.group(1), match.group(2) or ""
    if not BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket) \
            or bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
        problems.append(f"{flag} {url!r}: {bucket!r} is not a valid S3 bucket name (3-63 characters: "
                        "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit)")
    elif BAD_PATH_CHARS.search(prefix) or not _encodable(prefix) or len(url) > MAX_S3_PATH:
        problems.append(f"{flag} {url!r}: the prefix must be valid UTF-8 without NUL or line breaks, "
                        f"at most {MAX_S3_PATH} characters in all")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nested(a: str, b: str) -> bool:
    """True when one slash-separated path is ``b`` or lies inside it (or the reverse)."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def build_plan(opts: DraOptions) -> DraPlan:
    """Validate every flag, then the plan; ``DraConfigError`` lists all problems at once."""
    problems: list[str] = []
    if not FILE_SYSTEM_ID.fullmatch(opts.file_system_id):
        problems.append(f"--file-system-id {opts.file_system_id!r}: must be fs- followed by 8-17 lowercase hex "
                        "digits, e.g. fs-0123456789abcdef0 (see `aws fsx describe-file-systems`)")
    wanted = [("training data", "--fsx-path", opts.fsx_path, "--s3", opts.s3,
               ("--import-policy", opts.import_policy), ("--export-policy", opts.export_policy))]
    if (opts.checkpoint_fsx_path is None) != (opts.checkpoint_s3 is None):
        problems.append("--checkpoint-fsx-path and --checkpoint-s3 go together: pass both or neither")
    elif opts.checkpoint_fsx_path is not None and opts.checkpoint_s3 is not None:
        wanted.append(("checkpoints", "--checkpoint-fsx-path", opts.checkpoint_fsx_path,
                       "--checkpoint-s3", opts.checkpoint_s3,
                       ("--checkpoint-import-policy", opts.checkpoint_import_policy),
                       ("--checkpoint-export-policy", opts.checkpoint_export_policy)))
    associations = []
    for role, path_flag, path, s3_flag, s3, (imp_flag, imp), (exp_flag, exp) in wanted:
        _check_fsx_path(path_flag, path, problems)
        _check_s3(s3_flag, s3, problems)
        associations.append(Association(role=role, fsx_path=path, s3_path=s3,
                                         import_events=_parse_events(imp_flag, imp, problems),
                                         export_events=_parse_events(exp_flag, exp, problems)))
    _check_pair(associations, problems)
    _check_common(opts, problems)
    if problems:
        raise DraConfigError(problems)
    return DraPlan(file_system_id=opts.file_system_id, associations=tuple(associations),
                   batch_import=opts.batch_import, imported_file_chunk_size=opts.imported_file_chunk_size,
                   region=opts.region, endpoint_url=opts.endpoint_url)


def _check_pair(associations: list[Association], problems: list[str]) -> None:
    """FSx: DRA paths may not overlap, and "/" is allowed only as a file system's single DRA."""
    if len(associations) < 2:
        return
    data, ckpt = associations
    if "/" in (data.fsx_path, ckpt.fsx_path):
        problems.append("--fsx-path/--checkpoint-fsx-path '/': the root can only be linked when it is the only "
                        "association; use separate directories such as /data and /checkpoints")
    elif _nested(data.fsx_path, ckpt.fsx_path):
        problems.append(f"--checkpoint-fsx-path {ckpt.fsx_path!r} overlaps --fsx-path {data.fsx_path!r}; "
                        "FSx needs separate directories such as /data and /checkpoints")
    if _nested(data.s3_path, ckpt.s3_path):
        problems.append(f"--checkpoint-s3 {ckpt.s3_path!r} overlaps --s3 {data.s3_path!r}; "
                        "each association needs its own S3 prefix")


def _check_common(opts: DraOptions, problems: list[str]) -> None:
    size = opts.imported_file_chunk_size
    if size is not None and not 1 <= size <= MAX_CHUNK_MIB:
        problems.append(f"--imported-file-chunk-size {size}: must be 1-{MAX_CHUNK_MIB} MiB (FSx default 1024)")
    if opts.region is not None and not REGION.fullmatch(opts.region):
        problems.append(f"--region {opts.region!r}: not an AWS region name such as us-east-1")
    if opts.endpoint_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", opts.endpoint_url):
        problems.append(f"--endpoint-url {opts.endpoint_url!r}: must be an http:// or https:// URL")


def render_request(plan: DraPlan, assoc: Association) -> dict[str, Any]:
    """The ``fsx.create_data_repository_association`` keyword arguments for one association."""
    request: dict[str, Any] = {
        "FileSystemId": plan.file_system_id,
        "FileSystemPath": assoc.fsx_path,
        "DataRepositoryPath": assoc.s3_path,
        "BatchImportMetaDataOnCreate": plan.batch_import,
    }
    if plan.imported_file_chunk_size is not None:
        request["ImportedFileChunkSize"] = plan.imported_file_chunk_size
    s3: dict[str, Any] = {}
    if assoc.import_events:
        s3["AutoImportPolicy"] = {"Events": list(assoc.import_events)}
    if assoc.export_events:
        s3["AutoExportPolicy"] = {"Events": list(assoc.export_events)}
    if s3:
        request["S3"] = s3
    return request


def render_cli(request: dict[str, Any], region: str | None = None, endpoint_url: str | None = None) -> str:
    """The same request as an ``aws fsx`` command line; every value shell-quoted."""
    argv = ["aws", "fsx", "create-data-repository-association",
            "--file-system-id", request["FileSystemId"],
            "--file-system-path", request["FileSystemPath"],
            "--data-repository-path", request["DataRepositoryPath"],
            "--batch-import-meta-data-on-create" if request["BatchImportMetaDataOnCreate"]
            else "--no-batch-import-meta-data-on-create"]
    if "ImportedFileChunkSize" in request:
        argv += ["--imported-file-chunk-size", str(request["ImportedFileChunkSize"])]
    if "S3" in request:
        argv += ["--s3", json.dumps(request["S3"], separators=(",", ":"))]
    if region:
        argv += ["--region", region]
    if endpoint_url:
        argv += ["--endpoint-url", endpoint_url]
    return " ".join(shlex.quote(arg) for arg in argv)


def render_dry_run(plan: DraPlan) -> str:
    """Human-readable dry run: each request as JSON and as an aws CLI command."""
    n = len(plan.associations)
    these = "this association" if n == 1 else f"these {n} associations"
    lines = [f"DRY RUN: nothing was created. Add --create to create {these}."]
    for i, assoc in enumerate(plan.associations, 1):
        request = render_request(plan, assoc)
        lines += ["", f"# {i}/{n} {assoc.role}: {assoc.fsx_path} <-> {assoc.s3_path}",
                  "boto3 fsx.create_data_repository_association(**request), request =",
                  json.dumps(request, indent=2, ensure_ascii=False), "aws CLI:",
                  render_cli(request, plan.region, plan.endpoint_url)]
    lines += ["", "note: auto-export is asynchronous and unordered across files; validate checkpoints read "
                  "from an exported path through their manifest."]
    return "\n".join(lines)


def dry_run_json(plan: DraPlan) -> dict[str, Any]:
    requests = [render_request(plan, a) for a in plan.associations]
    return {"dry_run": True, "created": [], "requests": requests,
            "cli": [render_cli(r, plan.region, plan.endpoint_url) for r in requests]}
