"""FSx for Lustre helpers: ``python -m cluster.fsx {preload,dra} ...``.

preload  restore a directory's files from the linked S3 repository (``lfs hsm_restore``),
         optionally waiting until none is released. Exit 0: all done; 1: some files failed
         (listed at the end); 2: cannot start (no lfs, not Lustre, bad flags).
dra      render (default, a dry run) or create (--create) the S3 <-> FSx data repository
         associations for training data and, optionally, checkpoints. Exit 0: done;
         1: AWS refused or could not be reached; 2: invalid flags or no credentials/region.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from cluster.fsx_dra import ALL_EVENTS, DraConfigError, DraOptions, DraPlan, build_plan, dry_run_json, render_dry_run
from cluster.fsx_dra_create import DraAwsError, create_associations, make_client, wait_available
from cluster.fsx_preload import PreloadConfig, PreloadError, PreloadReport, preload
from cluster.fsx_progress import human_bytes, make_progress

MAX_LISTED_FAILURES = 20
ClientFactory = Callable[[str | None, str | None], Any]

DRA_EPILOG = """\
Auto-export is asynchronous and unordered across files: a manifest or `latest` can reach S3
before the shards it names. Checkpoints read back from an exported path must still be validated
through their manifest. hyperlaunch's checkpointing replicates to S3 itself, so the checkpoint
association defaults to import only (reading checkpoints back); export is opt-in everywhere
because an exported DELETED event deletes objects from S3.
Credentials come from boto3's default chain (environment, ~/.aws, instance profile)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.fsx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preload", help="restore files from S3 into FSx for Lustre (lfs hsm_restore)")
    pre.add_argument("directory", help="directory on the FSx for Lustre mount, restored recursively")
    pre.add_argument("--jobs", type=int, default=8, help="lfs processes at once (default 8)")
    pre.add_argument("--batch-size", type=int, default=256, help="files per lfs call (default 256)")
    pre.add_argument("--lfs", default="lfs", help="lfs program, name on PATH or path (default lfs)")
    pre.add_argument("--wait", action="store_true", help="poll lfs hsm_state until no file is released")
    pre.add_argument("--poll-interval", type=float, default=10.0, help="seconds between polls (default 10)")
    pre.add_argument("--timeout", type=float, default=0.0, help="give up waiting after N s (default 0: never)")
    pre.add_argument("--no-mount-check", action="store_true",
                     help="skip the check that the directory is on a lustre mount")
    dra = sub.add_parser("dra", help="S3 <-> FSx data repository associations (dry run unless --create)",
                         epilog=DRA_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    dra.add_argument("--file-system-id", required=True, help="e.g. fs-0123456789abcdef0")
    dra.add_argument("--fsx-path", required=True, help="training data directory on FSx, e.g. /data")
    dra.add_argument("--s3", required=True, help="s3://bucket[/prefix] linked to --fsx-path")
    dra.add_argument("--checkpoint-fsx-path", help="checkpoint directory on FSx, e.g. /checkpoints")
    dra.add_argument("--checkpoint-s3", help="s3://bucket[/prefix] linked to --checkpoint-fsx-path")
    for prefix, what in (("", "training data"), ("checkpoint-", "checkpoint")):
        dra.add_argument(f"--{prefix}import-policy", default=ALL_EVENTS,
                         help=f"{what} auto-import events: comma list of NEW,CHANGED,DELETED, or none "
                              f"(default {ALL_EVENTS})")
        dra.add_argument(f"--{prefix}export-policy", default="none",
                         help=f"{what} auto-export events (default none; see below)")
    dra.add_argument("--no-batch-import", dest="batch_import", action="store_false",
                     help="do not import existing S3 metadata when the association is created")
    dra.add_argument("--imported-file-chunk-size", type=int, help="MiB per stripe for imported files (1-512000)")
    dra.add_argument("--region", help="AWS region (default: boto3's, e.g. AWS_REGION)")
    dra.add_argument("--endpoint-url", help="FSx API endpoint override (VPC endpoint, test server)")
    dra.add_argument("--create", action="store_true", help="create the associations (default: dry run)")
    dra.add_argument("--wait", action="store_true", help="with --create: wait until Lifecycle is AVAILABLE")
    dra.add_argument("--wait-timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    dra.add_argument("--poll-interval", type=float, default=15.0, help="seconds between polls (default 15)")
    dra.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _show(path: str) -> str:
    """A path safe to print on one line: odd names (newlines, undecodable bytes) are escaped."""
    return path if path.isprintable() and path.encode("utf-8", "replace").decode() == path else repr(path)


def render_preload_summary(report: PreloadReport) -> list[str]:
    restored = f", {report.restored} restored" if report.waited else ""
    lines = [f"preload: {report.files} files ({human_bytes(report.bytes)}) under {_show(report.root)}: "
             f"{report.requested} restore requests accepted{restored}"]
    if report.other_mounts:
        lines.append(f"preload: skipped {len(report.other_mounts)} directories on other file systems: "
                     + ", ".join(_show(p) for p in report.other_mounts[:5]))
    if report.failures:
        n = len(report.failures)
        lines.append(f"preload: {n} failure{'' if n == 1 else 's'}:")
        lines += [f"  {f.step} {_show(f.path)}: {f.message}" for f in report.failures[:MAX_LISTED_FAILURES]]
        if len(report.failures) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(report.failures) - MAX_LISTED_FAILURES} more")
    return lines


def run_preload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cfg = PreloadConfig(root=args.directory, jobs=args.jobs, batch_files=args.batch_size, lfs=args.lfs,
                        wait=args.wait, poll_interval_s=args.poll_interval, timeout_s=args.timeout,
                        check_mount=not args.no_mount_check)
    try:
        report = preload(cfg, lambda: make_progress(out))
    except PreloadError as exc:
        print(f"error: {exc}", file=err)
        return 2
    print("\n".join(render_preload_summary(report)), file=out)
    return 1 if report.failures else 0


def _dra_options(args: argparse.Namespace) -> DraOptions:
    return DraOptions(file_system_id=args.file_system_id, fsx_path=args.fsx_path, s3=args.s3,
                      checkpoint_fsx_path=args.checkpoint_fsx_path, checkpoint_s3=args.checkpoint_s3,
                      import_policy=args.import_policy, export_policy=args.export_policy,
                      checkpoint_import_policy=args.checkpoint_import_policy,
                      checkpoint_export_policy=args.checkpoint_export_policy, batch_import=args.batch_import,
                      imported_file_chunk_size=args.imported_file_chunk_size, region=args.region,
                      endpoint_url=args.endpoint_url)


def _create(plan: DraPlan, args: argparse.Namespace, client_factory: ClientFactory, out: TextIO) -> int:
    client = client_factory(plan.region, plan.endpoint_url)
    created = create_associations(client, plan)
    ids = [a["AssociationId"] for a in created]
    if args.wait:
        created = wait_available(client, ids, args.wait_timeout, args.poll_interval, plan.endpoint_url)
    if args.json:
        print(json.dumps({"dry_run": False, "created": created}, default=str), file=out)
    else:
        for a in created:
            print(f"created {a['AssociationId']}: {_show(a['FileSystemPath'])} <-> {_show(a['DataRepositoryPath'])} "
                  f"(Lifecycle {a.get('Lifecycle', '?')})", file=out)
    return 0


def run_dra(args: argparse.Namespace, out: TextIO, err: TextIO,
            client_factory: ClientFactory = make_client) -> int:
    problems = []
    if args.wait and not args.create:
        problems.append("--wait: only means something with --create; add --create or drop --wait")
    if not args.wait_timeout > 0 or not args.poll_interval > 0:
        problems.append(f"--wait-timeout {args.wait_timeout:g} / --poll-interval {args.poll_interval:g}: "
                        "must be > 0 seconds")
    plan = None
    try:
        plan = build_plan(_dra_options(args))
    except DraConfigError as exc:
        problems = exc.problems + problems
    if plan is None or problems:
        print(f"error: {DraConfigError(problems)}", file=err)
        return 2
    if not args.create:
        print(json.dumps(dry_run_json(plan), indent=2) if args.json else render_dry_run(plan), file=out)
        return 0
    try:
        return _create(plan, args, client_factory, out)
    except DraAwsError as exc:
        made = "".join(f"; already created: {a['AssociationId']} ({_show(a['FileSystemPath'])})"
                       for a in exc.created)
        print(f"error: {exc}{made}", file=err)
        return exc.exit_code


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
         client_factory: ClientFactory = make_client) -> int:
    args = build_parser().parse_args(argv)
    out, err = out or sys.stdout, err or sys.stderr
    try:
        if args.command == "preload":
            return run_preload(args, out, err)
        return run_dra(args, out, err, client_factory)
    except KeyboardInterrupt:
        print("error: interrupted; restores already requested keep running on the file system", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
