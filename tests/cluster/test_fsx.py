"""FSx for Lustre helpers: ``python -m cluster.fsx preload`` against a fake ``lfs`` (no Lustre
here) that follows lfs.c's semantics, and ``python -m cluster.fsx dra`` rendering, validation,
botocore's Stubber for the create/wait flow, real botocore error paths and a moto server."""

from __future__ import annotations

import io
import json
import os
import pty
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.fsx import main
from cluster.fsx_dra import DraOptions, build_plan, render_cli, render_request
from cluster.fsx_dra_create import DraAwsError, wait_available
from cluster.fsx_lfs import parse_hsm_state
from cluster.fsx_preload import LustreFile, mount_of, parse_mountinfo, plan_batches
from tests.checkpointing.s3_services import CREDENTIALS, MotoServer, free_port

ROOT = Path(__file__).resolve().parents[2]

# A fake lfs with the semantics of lustre/utils/lfs.c: hsm_restore takes getopt options and
# sends one request, so one bad file fails the whole call and restores nothing; hsm_state has
# no options, prints "<path>: (0x..) flags, archive_id:N" and stops at the first unreadable file.
# A restored file reads as released for $S/polls more hsm_state calls. Per-file state and
# failure markers live at "$S/<kind><absolute path>", so any name works. bash, because a Python
# fake would spend most of the test starting interpreters.
FAKE_LFS = r"""#!/bin/bash
set -u
S=$FAKE_LFS_STATE
cmd=$1; shift
me="$S/active/$$"
: > "$me"
running=("$S"/active/*)
echo "${#running[@]}" >> "$S/concurrency"
sleep "$(<"$S/sleep")"

finish() {  # log: cmd, rc, argc, argv... NUL-separated, one file per call
    printf '%s\0' "$cmd" "$1" "${#args[@]}" "${args[@]}" > "$S/calls/${EPOCHREALTIME}-$$"
    rm -f "$me"
    exit "$1"
}

set_state() { mkdir -p "$S/tree${1%/*}"; echo "$2" > "$S/tree$1"; }

hsm_restore() {
    [[ ${1-} == -- ]] && shift
    for p in "$@"; do
        if [[ $p == -* || $p != /* ]]; then echo "error: hsm_restore: option or relative path $p" >&2; finish 22; fi
        if [[ ! -f $p || -e $S/fail_restore$p ]]; then
            printf 'Cannot read FID of %s: Operation not permitted\n' "$p" >&2; finish 1
        fi
    done
    for p in "$@"; do
        if [[ -e $S/stuck$p ]]; then set_state "$p" stuck; else set_state "$p" "restoring:$(<"$S/polls")"; fi
    done
    finish 0
}

hsm_state() {
    for p in "$@"; do
        if [[ -e $S/fail_state$p || ! -e $p ]]; then
            printf "can't get hsm state for %s: No such file or directory\n" "$p" >&2; finish 2
        fi
        st="exists archived"; [[ -f $S/tree$p ]] && st=$(<"$S/tree$p")
        released=0
        case $st in
            released|stuck) released=1 ;;
            restoring:*) left=${st#restoring:}
                if ((left > 0)); then released=1; set_state "$p" "restoring:$((left - 1))"
                else set_state "$p" "exists archived"; fi ;;
        esac
        flags="(0x00000009) exists archived"
        ((released)) && flags="(0x0000000d) released exists archived"
        printf '%s: %s, archive_id:1\n' "$p" "$flags"
    done
    finish 0
}

args=("$@")
case $cmd in
    hsm_restore) hsm_restore "$@" ;;
    hsm_state) hsm_state "$@" ;;
    *) echo "fake lfs: unknown command $cmd" >&2; finish 2 ;;
esac
"""

HOSTILE_NAMES = ["a b.bin", "it's \"quoted\".bin", "new\nline.bin", "-rf", "--help", "$(touch pwned)",
                 "*glob?[x]", "données.bin", os.fsdecode(b"bad\xffbyte.bin"), "trailing space ", "tab\there"]


class FakeLfs:
    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.state = tmp_path / "lfs-state"
        for sub in (self.bin, self.state / "active", self.state / "calls"):
            sub.mkdir(parents=True)
        lfs = self.bin / "lfs"
        lfs.write_text(FAKE_LFS)
        lfs.chmod(0o755)
        self.configure()

    def _mark(self, kind: str, path: str, text: str = "") -> None:
        target = os.fsencode(self.state) + b"/" + kind.encode() + os.fsencode(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)

    def configure(self, restore_fail: list[str] = [], state_fail: list[str] = [], stuck: list[str] = [],
                  polls: int = 1, sleep: float = 0.01) -> None:
        (self.state / "polls").write_text(str(polls))
        (self.state / "sleep").write_text(str(sleep))
        for kind, paths in (("fail_restore", restore_fail), ("fail_state", state_fail), ("stuck", stuck)):
            for path in paths:
                self._mark(kind, path)

    def release(self, paths: list[str]) -> None:
        for path in paths:
            self._mark("tree", path, "released\n")

    def calls(self, cmd: str) -> list[dict[str, Any]]:
        entries = []
        for log in sorted((self.state / "calls").iterdir()):
            fields = [os.fsdecode(f) for f in log.read_bytes().split(b"\0")[:-1]]
            assert len(fields) == 3 + int(fields[2])
            entries.append({"cmd": fields[0], "rc": int(fields[1]), "argv": fields[3:]})
        return [e for e in entries if e["cmd"] == cmd]

    def restored_paths(self) -> list[str]:
        return [p for call in self.calls("hsm_restore") if call["rc"] == 0 for p in call["argv"][1:]]

    def max_active(self) -> int:
        return max(int(n) for n in (self.state / "concurrency").read_text().split())

    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_LFS_STATE": str(self.state)}


@pytest.fixture
def fake_lfs(tmp_path: Path) -> FakeLfs:
    return FakeLfs(tmp_path)


def make_tree(root: Path, bulk: int = 40) -> list[str]:
    """Hostile names at the top and in a hostile subdirectory, plus ``bulk`` plain files."""
    paths = []
    for directory in (root, root / "sub dir" / "-x" / "it's"):
        directory.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(HOSTILE_NAMES):
            (directory / name).write_bytes(b"x" * (i + 1))
            paths.append(str(directory / name))
    for i in range(bulk):
        (root / f"shard-{i:03d}.bin").write_bytes(b"y" * 1000)
        paths.append(str(root / f"shard-{i:03d}.bin"))
    (root / "link").symlink_to(root / "a b.bin")  # symlinks are not restored
    return sorted(paths)


def run_fsx(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.fsx", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, errors="backslashreplace", timeout=timeout)


# ----------------------------------------------------------------------------- preload, pure parts


def test_plan_batches_caps_files_and_argv_bytes() -> None:
    files = [LustreFile(f"/fsx/{i:02d}", 1) for i in range(10)]
    assert [len(b) for b in plan_batches(files, max_files=4)] == [4, 4, 2]
    assert [len(b) for b in plan_batches(files, max_files=100, max_bytes=24)] == [3, 3, 3, 1]  # 8 argv bytes each
    long = LustreFile("/" + "x" * 50, 1)  # longer than max_bytes alone: still sent, one per call
    assert plan_batches([long, long], 10, max_bytes=10) == [[long], [long]]
    assert [f for b in plan_batches(files, 3) for f in b] == files


def test_parse_hsm_state_reads_names_with_newlines_and_stops_where_lfs_stopped() -> None:
    paths = ["/fsx/new\nline: (0x0000000d) released", "/fsx/b", "/fsx/c"]
    out = (b"/fsx/new\nline: (0x0000000d) released: (0x00000009) exists archived, archive_id:1\n"
           b"/fsx/b: (0x0000000d) released exists archived, archive_id:1\n")
    assert parse_hsm_state(out, paths) == [False, True]
    assert parse_hsm_state(b"garbage\n", paths) == []


def test_mountinfo_finds_the_innermost_mount_and_unescapes_spaces() -> None:
    text = ("22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw\n"
            "40 22 0:40 / /fsx\\040data rw,relatime shared:20 - lustre 10.0.0.1@tcp:/abcdef rw,flock\n"
            "41 40 0:41 / /fsx\\040data/scratch rw - tmpfs tmpfs rw\n")
    mounts = parse_mountinfo(text)
    assert mounts[1] == ("/fsx data", "lustre")
    assert mount_of("/fsx data/train/x.bin", mounts) == ("/fsx data", "lustre")
    assert mount_of("/fsx data/scratch/y", mounts) == ("/fsx data/scratch", "tmpfs")
    assert mount_of("/fsx databank", mounts) == ("/", "ext4")


# ----------------------------------------------------------------------------- preload, CLI + fake lfs


def test_preload_restores_every_file_exactly_once_with_bounded_concurrency(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    root = tmp_path / "data root 'x'"
    paths = make_tree(root)
    fake_lfs.configure(sleep=0.1)  # calls last long enough to overlap
    fake_lfs.release(paths)
    proc = run_fsx("preload", str(root), "--jobs", "3", "--batch-size", "7", "--wait", "--poll-interval", "0.05",
                   "--no-mount-check", env=fake_lfs.env())
    assert proc.returncode == 0, proc.stderr
    restored = fake_lfs.restored_paths()
    assert sorted(restored) == paths  # each file once, hostile names intact, symlink skipped
    restores = fake_lfs.calls("hsm_restore")
    assert len(restores) == -(-len(paths) // 7) and all(c["argv"][0] == "--" for c in restores)
    states = fake_lfs.calls("hsm_state")
    assert all(p.startswith("/") for c in states for p in c["argv"])
    assert len(states) >= 2 * len(restores)  # released after the restore, then resident: polled twice
    assert 2 <= fake_lfs.max_active() <= 3
    size = sum(os.path.getsize(p) for p in paths)
    assert f"preload: requested {len(paths)}/{len(paths)} files" in proc.stdout
    assert f"preload: restored {len(paths)}/{len(paths)} files" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last == (f"preload: {len(paths)} files ({size / 1024:.1f} KiB) under {root}: "
                    f"{len(paths)} restore requests accepted, {len(paths)} restored")
    assert not (Path(ROOT) / "pwned").exists() and proc.stderr == ""


def test_preload_without_wait_only_requests(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    paths = make_tree(tmp_path / "d", bulk=3)
    proc = run_fsx("preload", str(tmp_path / "d"), "--no-mount-check", env=fake_lfs.env())
    assert proc.returncode == 0, proc.stderr
    assert sorted(fake_lfs.restored_paths()) == paths and fake_lfs.calls("hsm_state") == []
    assert proc.stdout.strip().splitlines()[-1].endswith(f": {len(paths)} restore requests accepted")


def test_preload_collects_partial_failures_and_exits_1(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    root = tmp_path / "d"
    paths = make_tree(root, bulk=10)
    bad_restore = [str(root / "new\nline.bin"), str(root / "shard-004.bin")]
    bad_state = str(root / "shard-007.bin")
    fake_lfs.configure(restore_fail=bad_restore, state_fail=[bad_state])
    fake_lfs.release(paths)
    proc = run_fsx("preload", str(root), "--jobs", "4", "--batch-size", "5", "--wait", "--poll-interval", "0.05",
                   "--no-mount-check", env=fake_lfs.env())
    assert proc.returncode == 1, proc.stderr
    restored = fake_lfs.restored_paths()
    assert sorted(restored) == sorted(set(paths) - set(bad_restore))  # the rest of a failed batch still goes
    assert len(restored) == len(set(restored))
    summary = proc.stdout[proc.stdout.index("preload: 3 failures:"):].splitlines()
    assert len(summary) == 4  # the header, then one line per failure
    text = "\n".join(summary)
    shard = root / "shard-004.bin"
    assert f"hsm_restore {shard}: Cannot read FID of {shard}: Operation not permitted" in text
    assert f"hsm_restore {bad_restore[0]!r}: Cannot read FID of {root}/new line.bin: Operation not permitted" in text
    assert f"hsm_state {bad_state}: can't get hsm state for {bad_state}: No such file or directory" in text
    assert f"{len(paths)} files" in proc.stdout and f"{len(paths) - 2} restore requests accepted" in proc.stdout
    assert f"{len(paths) - 3} restored" in proc.stdout


def test_preload_wait_times_out_on_a_stuck_file(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    paths = make_tree(tmp_path / "d", bulk=2)
    stuck = str(tmp_path / "d" / "shard-000.bin")
    fake_lfs.configure(stuck=[stuck], sleep=0.0)
    fake_lfs.release(paths)
    start = time.monotonic()
    proc = run_fsx("preload", str(tmp_path / "d"), "--wait", "--timeout", "0.5", "--poll-interval", "0.1",
                   "--no-mount-check", env=fake_lfs.env())
    assert proc.returncode == 1 and time.monotonic() - start < 15
    assert proc.stdout.splitlines()[-2:] == ["preload: 1 failure:", f"  wait {stuck}: still released after 0.5 s"]
    assert f"{len(paths) - 1} restored" in proc.stdout


def test_preload_without_lfs_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = run_fsx("preload", str(tmp_path / "d"), env={**os.environ, "PATH": str(empty)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: `lfs` (the Lustre client) is not installed")
    assert "not an FSx for Lustre client node" in proc.stderr and "HyperPod" in proc.stderr
    assert "lustre-client" in proc.stderr and "--lfs" in proc.stderr


def test_preload_rejects_bad_directory_flags_and_non_lustre_mounts(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    proc = run_fsx("preload", str(tmp_path / "missing"), "--jobs", "0", env=fake_lfs.env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"directory {str(tmp_path / 'missing')!r} does not exist" in proc.stderr
    assert "--jobs 0: must be between 1 and 256" in proc.stderr
    (tmp_path / "d").mkdir()
    proc = run_fsx("preload", str(tmp_path / "d"), env=fake_lfs.env())  # tmp_path is not Lustre
    assert proc.returncode == 2 and "not FSx for Lustre" in proc.stderr and "--no-mount-check" in proc.stderr
    assert fake_lfs.calls("hsm_restore") == []


def test_preload_shows_a_rich_progress_bar_on_a_terminal(fake_lfs: FakeLfs, tmp_path: Path) -> None:
    paths = make_tree(tmp_path / "d", bulk=5)
    fake_lfs.release(paths)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.fsx", "preload", str(tmp_path / "d"), "--wait",
                             "--poll-interval", "0.05", "--no-mount-check"], cwd=ROOT, stdout=slave, stderr=slave,
                            env={**fake_lfs.env(), "COLUMNS": "160", "TERM": "xterm"})
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "━" in screen and "\x1b[" in screen  # a drawn bar with terminal control codes
    assert f"{len(paths)}/{len(paths)}" in screen and "requested" in screen and "restored" in screen
    assert "preload: requested" not in screen  # not the plain-line fallback


# ----------------------------------------------------------------------------- dra, pure rendering

FS = "fs-0123456789abcdef0"


def plan_for(**overrides: Any) -> Any:
    opts = {"file_system_id": FS, "fsx_path": "/data", "s3": "s3://train-bucket/datasets/llama"}
    return build_plan(DraOptions(**{**opts, **overrides}))


def test_render_requests_for_data_and_checkpoints() -> None:
    plan = plan_for(checkpoint_fsx_path="/checkpoints", checkpoint_s3="s3://ckpt-bucket/run1",
                    export_policy="new,changed", checkpoint_import_policy="NEW,NEW", imported_file_chunk_size=2048)
    assert [render_request(plan, a) for a in plan.associations] == [
        {"FileSystemId": FS, "FileSystemPath": "/data", "DataRepositoryPath": "s3://train-bucket/datasets/llama",
         "BatchImportMetaDataOnCreate": True, "ImportedFileChunkSize": 2048,
         "S3": {"AutoImportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]},
                "AutoExportPolicy": {"Events": ["NEW", "CHANGED"]}}},
        {"FileSystemId": FS, "FileSystemPath": "/checkpoints", "DataRepositoryPath": "s3://ckpt-bucket/run1",
         "BatchImportMetaDataOnCreate": True, "ImportedFileChunkSize": 2048,
         "S3": {"AutoImportPolicy": {"Events": ["NEW"]}}},
    ]
    bare = plan_for(fsx_path="/", import_policy="none", batch_import=False)  # "/" is fine as the only DRA
    assert render_request(bare, bare.associations[0]) == {
        "FileSystemId": FS, "FileSystemPath": "/", "DataRepositoryPath": "s3://train-bucket/datasets/llama",
        "BatchImportMetaDataOnCreate": False}


def test_render_cli_exact_and_round_trips_hostile_values_through_bash(tmp_path: Path) -> None:
    plan = plan_for(region="us-west-2", endpoint_url="https://fsx.us-west-2.amazonaws.com")
    request = render_request(plan, plan.associations[0])
    assert render_cli(request, plan.region, plan.endpoint_url) == (
        "aws fsx create-data-repository-association --file-system-id fs-0123456789abcdef0 "
        "--file-system-path /data --data-repository-path s3://train-bucket/datasets/llama "
        "--batch-import-meta-data-on-create "
        "--s3 '{\"AutoImportPolicy\":{\"Events\":[\"NEW\",\"CHANGED\",\"DELETED\"]}}' "
        "--region us-west-2 --endpoint-url https://fsx.us-west-2.amazonaws.com")
    hostile_path = "/data/it's \"a\" $(touch pwned) `id` ; rm -rf ~ *"
    hostile_s3 = "s3://bucket.with.dots/pre fix/'q'/$HOME/-x"
    plan = plan_for(fsx_path=hostile_path, s3=hostile_s3, export_policy="DELETED", batch_import=False)
    request = render_request(plan, plan.associations[0])
    cli = render_cli(request)
    aws = tmp_path / "aws"  # a stand-in aws that prints its argv: proves what a real shell passes
    aws.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    aws.chmod(0o755)
    out = subprocess.run(["bash", "-c", cli], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}).stdout
    argv = json.loads(out)
    assert argv == shlex.split(cli)[1:]
    assert argv[argv.index("--file-system-path") + 1] == hostile_path
    assert argv[argv.index("--data-repository-path") + 1] == hostile_s3
    assert "--no-batch-import-meta-data-on-create" in argv
    assert json.loads(argv[argv.index("--s3") + 1]) == request["S3"]
    assert not (tmp_path / "pwned").exists()


def test_dry_run_creates_nothing_and_prints_requests_and_cli() -> None:
    def no_client(*_: Any) -> Any:
        raise AssertionError("a dry run must not create an AWS client")

    out, err = io.StringIO(), io.StringIO()
    args = ["dra", "--file-system-id", FS, "--fsx-path", "/data", "--s3", "s3://train-bucket/x",
            "--checkpoint-fsx-path", "/checkpoints", "--checkpoint-s3", "s3://train-bucket/ckpt"]
    assert main(args, out, err, no_client) == 0 and err.getvalue() == ""
    text = out.getvalue()
    assert text.startswith("DRY RUN: nothing was created. Add --create to create these 2 associations.")
    assert text.count("aws fsx create-data-repository-association") == 2
    assert "auto-export is asynchronous and unordered" in text
    out = io.StringIO()
    assert main([*args, "--json"], out, err, no_client) == 0
    doc = json.loads(out.getvalue())
    assert doc["dry_run"] is True and doc["created"] == []
    assert [r["FileSystemPath"] for r in doc["requests"]] == ["/data", "/checkpoints"]
    assert doc["cli"][1].startswith("aws fsx create-data-repository-association --file-system-id " + FS)


@pytest.mark.parametrize("flags, expected", [
    (["--file-system-id", "fs-12"], "--file-system-id 'fs-12': must be fs- followed by 8-17 lowercase hex digits"),
    (["--file-system-id", "fs-0123456789ABCDEF0"], "--file-system-id 'fs-0123456789ABCDEF0'"),
    (["--fsx-path", "data"], "--fsx-path 'data': must be an absolute path on the file system, e.g. /data"),
    (["--fsx-path", "/data/../etc"], "--fsx-path '/data/../etc': no empty, '.' or '..' components"),
    (["--fsx-path", "/da\nta"], "--fsx-path '/da\\nta': must be valid UTF-8 without NUL or line breaks"),
    (["--s3", "https://bucket/x"], "--s3 'https://bucket/x': must be s3://bucket or s3://bucket/prefix/"),
    (["--s3", "s3://Bucket/x"], "--s3 's3://Bucket/x': 'Bucket' is not a valid S3 bucket name"),
    (["--s3", "s3://a..b/x"], "'a..b' is not a valid S3 bucket name"),
    (["--s3", "s3://192.168.1.1"], "'192.168.1.1' is not a valid S3 bucket name"),
    (["--s3", "s3://ab"], "'ab' is not a valid S3 bucket name"),
    (["--import-policy", "NEW,MODIFIED"], "--import-policy 'NEW,MODIFIED': unknown event MODIFIED; use a comma list"),
    (["--checkpoint-fsx-path", "/ckpt"], "--checkpoint-fsx-path and --checkpoint-s3 go together"),
    (["--checkpoint-fsx-path", "/data/ckpt", "--checkpoint-s3", "s3://other-bucket/c"],
     "--checkpoint-fsx-path '/data/ckpt' overlaps --fsx-path '/data'"),
    (["--fsx-path", "/", "--checkpoint-fsx-path", "/ckpt", "--checkpoint-s3", "s3://other-bucket/c"],
     "the root can only be linked when it is the only association"),
    (["--checkpoint-fsx-path", "/ckpt", "--checkpoint-s3", "s3://train-bucket/x/ckpt"],
     "--checkpoint-s3 's3://train-bucket/x/ckpt' overlaps --s3 's3://train-bucket/x'"),
    (["--imported-file-chunk-size", "0"], "--imported-file-chunk-size 0: must be 1-512000 MiB"),
    (["--region", "US East"], "--region 'US East': not an AWS region name"),
    (["--endpoint-url", "fsx.local"], "--endpoint-url 'fsx.local': must be an http:// or https:// URL"),
    (["--wait"], "--wait: only means something with --create"),
])
def test_dra_validation_names_flag_value_and_fix(flags: list[str], expected: str) -> None:
    base = {"--file-system-id": FS, "--fsx-path": "/data", "--s3": "s3://train-bucket/x"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base.pop(flag, None)
    argv = ["dra", *[x for kv in base.items() for x in kv], *flags]
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, out, err) == 2 and out.getvalue() == ""
    assert err.getvalue().startswith("error: invalid data repository association settings:\n  ")
    assert expected in err.getvalue()


def test_dra_validation_reports_every_problem_at_once() -> None:
    err = io.StringIO()
    assert main(["dra", "--file-system-id", "x", "--fsx-path", "rel", "--s3", "s3://B",
                 "--export-policy", "ALL"], io.StringIO(), err) == 2
    assert err.getvalue().count("\n  ") == 4


# ----------------------------------------------------------------------------- dra --create

DRA_ARGS = ["dra", "--file-system-id", FS, "--fsx-path", "/data", "--s3", "s3://train-bucket/x",
            "--checkpoint-fsx-path", "/checkpoints", "--checkpoint-s3", "s3://train-bucket/ckpt", "--create"]


def association(assoc_id: str, path: str, s3: str, lifecycle: str, **extra: Any) -> dict[str, Any]:
    return {"AssociationId": assoc_id, "FileSystemId": FS, "FileSystemPath": path, "DataRepositoryPath": s3,
            "Lifecycle": lifecycle, **extra}


DATA = ("dra-0123456789abcdef0", "/data", "s3://train-bucket/x")
CKPT = ("dra-0123456789abcdef1", "/checkpoints", "s3://train-bucket/ckpt")


@pytest.fixture
def stubbed() -> Any:
    """A real botocore FSx client whose HTTP layer is botocore's Stubber: request shapes are
    checked against the FSx service model, responses against its output shapes."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("fsx", region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def expect_creates(stubber: Any, n: int = 2) -> None:
    plan = build_plan(DraOptions(file_system_id=FS, fsx_path="/data", s3="s3://train-bucket/x",
                                 checkpoint_fsx_path="/checkpoints", checkpoint_s3="s3://train-bucket/ckpt"))
    for (assoc_id, path, s3), assoc in list(zip((DATA, CKPT), plan.associations))[:n]:
        stubber.add_response("create_data_repository_association",
                             {"Association": association(assoc_id, path, s3, "CREATING")},
                             render_request(plan, assoc))


def test_create_calls_fsx_once_per_association_and_prints_ids(stubbed: Any) -> None:
    client, stubber = stubbed
    expect_creates(stubber)
    out, err = io.StringIO(), io.StringIO()
    assert main(DRA_ARGS, out, err, lambda region, url: client) == 0, err.getvalue()
    assert out.getvalue().splitlines() == [
        "created dra-0123456789abcdef0: /data <-> s3://train-bucket/x (Lifecycle CREATING)",
        "created dra-0123456789abcdef1: /checkpoints <-> s3://train-bucket/ckpt (Lifecycle CREATING)"]


def test_create_wait_polls_until_available_and_prints_json(stubbed: Any) -> None:
    client, stubber = stubbed
    expect_creates(stubber)
    ids = {"AssociationIds": [DATA[0], CKPT[0]]}
    stubber.add_response("describe_data_repository_associations", {"Associations": [
        association(*DATA, "AVAILABLE"), association(*CKPT, "CREATING")]}, ids)
    stubber.add_response("describe_data_repository_associations", {"Associations": [
        association(*DATA, "AVAILABLE"), association(*CKPT, "AVAILABLE")]}, ids)
    out, err = io.StringIO(), io.StringIO()
    assert main([*DRA_ARGS, "--wait", "--poll-interval", "0.01", "--json"], out, err,
                lambda region, url: client) == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    assert doc["dry_run"] is False
    states = [(a["AssociationId"], a["Lifecycle"]) for a in doc["created"]]
    assert states == [(DATA[0], "AVAILABLE"), (CKPT[0], "AVAILABLE")]


def test_create_access_denied_on_the_second_names_the_first(stubbed: Any) -> None:
    client, stubber = stubbed
    expect_creates(stubber, n=1)
    stubber.add_client_error("create_data_repository_association", "AccessDeniedException",
                             "User: arn:aws:sts::123456789012:assumed-role/x is not authorized", 400)
    out, err = io.StringIO(), io.StringIO()
    assert main(DRA_ARGS, out, err, lambda region, url: client) == 1 and out.getvalue() == ""
    line = err.getvalue()
    assert line.count("\n") == 1 and line.startswith(
        "error: AWS denied fsx:CreateDataRepositoryAssociation (AccessDeniedException): User: arn:aws:sts::")
    assert "fix: give the role in use fsx:CreateDataRepositoryAssociation" in line
    assert line.rstrip().endswith(f"; already created: {DATA[0]} (/data)")


def test_create_wait_reports_a_misconfigured_association(stubbed: Any) -> None:
    client, stubber = stubbed
    expect_creates(stubber)
    stubber.add_response("describe_data_repository_associations", {"Associations": [
        association(*DATA, "AVAILABLE"),
        association(*CKPT, "MISCONFIGURED", FailureDetails={"Message": "bucket policy\ndenies FSx"})]},
        {"AssociationIds": [DATA[0], CKPT[0]]})
    err = io.StringIO()
    assert main([*DRA_ARGS, "--wait"], io.StringIO(), err, lambda region, url: client) == 1
    assert err.getvalue() == (f"error: association {CKPT[0]} is MISCONFIGURED: bucket policy denies FSx; "
                              f"fix the cause, delete it (aws fsx delete-data-repository-association --association-id {CKPT[0]}) "
                              "and create it again\n")


def test_wait_available_times_out() -> None:
    class Creating:
        calls = 0

        def describe_data_repository_associations(self, AssociationIds: list[str]) -> dict[str, Any]:
            self.calls += 1
            return {"Associations": [association(*DATA, "CREATING")]}

    now = [0.0]
    client = Creating()
    with pytest.raises(DraAwsError, match=r"not AVAILABLE after 60 s \(dra-0123456789abcdef0 CREATING\)") as info:
        wait_available(client, [DATA[0]], timeout_s=60, poll_s=15, sleep=lambda s: now.__setitem__(0, now[0] + s),
                       clock=lambda: now[0])
    assert info.value.exit_code == 1 and client.calls == 5  # t = 0, 15, 30, 45, 60


def clean_aws_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1", **extra}


def test_create_without_credentials_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_fsx(*DRA_ARGS, "--region", "us-east-1", "--endpoint-url", f"http://127.0.0.1:{free_port()}",
                   env=clean_aws_env(tmp_path))
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no AWS credentials found")


@pytest.mark.parametrize("region_env", [{}, {"AWS_REGION": ""}])
def test_create_without_region_is_one_line_exit_2(tmp_path: Path, region_env: dict[str, str]) -> None:
    keys = {k: v for k, v in CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"}
    proc = run_fsx(*DRA_ARGS, env=clean_aws_env(tmp_path, **keys, **region_env))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: no AWS region configured; fix: pass --region (e.g. us-east-1) or set AWS_REGION\n"


def test_create_against_an_unreachable_endpoint_is_one_line_exit_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_fsx(*DRA_ARGS, "--endpoint-url", url, env=clean_aws_env(tmp_path, **CREDENTIALS))
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: cannot reach {url} (Could not connect to the endpoint URL")
    assert "testing" not in proc.stderr  # the secret key never shows


def moto_has_dra() -> bool:
    """Read moto's FSx backend source instead of importing moto (seconds) at collection time."""
    import importlib.util

    spec = importlib.util.find_spec("moto")
    models = Path(spec.origin or "").parent / "fsx" / "models.py" if spec else Path("/nonexistent")
    return models.exists() and "def create_data_repository_association" in models.read_text()


@pytest.fixture
def moto_fsx(tmp_path: Path) -> Any:
    import boto3

    server = MotoServer(tmp_path / "moto").start()
    try:
        client = boto3.client("fsx", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        fs = client.create_file_system(FileSystemType="LUSTRE", StorageCapacity=1200,
                                       SubnetIds=["subnet-0123456789abcdef0"],
                                       LustreConfiguration={"DeploymentType": "PERSISTENT_2",
                                                            "PerUnitStorageThroughput": 125})
        yield server, client, fs["FileSystem"]["FileSystemId"]
    finally:
        server.kill()


@pytest.mark.skipif(moto_has_dra(), reason="moto implements DRAs now: test_create_against_moto_for_real covers it")
def test_moto_server_lacks_dra_and_its_500_is_one_line(moto_fsx: Any, tmp_path: Path) -> None:
    """moto 5 serves FSx file systems and backups, not DRAs: its server answers
    CreateDataRepositoryAssociation with HTTP 500 (NotImplementedError in its log). The CLI still
    reaches a real endpoint, signs, sends and turns the failure into one line."""
    server, _, fs_id = moto_fsx
    proc = run_fsx("dra", "--file-system-id", fs_id, "--fsx-path", "/data", "--s3", "s3://train-bucket/x",
                   "--create", "--endpoint-url", server.endpoint,
                   env=clean_aws_env(tmp_path, **CREDENTIALS))
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(
        "error: CreateDataRepositoryAssociation failed (500, HTTP 500): 500 Internal Server Error")
    log = (tmp_path / "moto" / f"moto-{server.port}.log").read_text()
    assert "NotImplementedError: The create_data_repository_association action has not been implemented" in log


@pytest.mark.skipif(not moto_has_dra(), reason="moto lacks FSx create_data_repository_association "
                    "(server: NotImplementedError, HTTP 500); the Stubber tests cover --create")
def test_create_against_moto_for_real(moto_fsx: Any, tmp_path: Path) -> None:
    server, client, fs_id = moto_fsx
    proc = run_fsx("dra", "--file-system-id", fs_id, "--fsx-path", "/data", "--s3", "s3://train-bucket/x",
                   "--create", "--wait", "--poll-interval", "0.1", "--wait-timeout", "30", "--json",
                   "--endpoint-url", server.endpoint, env=clean_aws_env(tmp_path, **CREDENTIALS))
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)["created"]
    found = client.describe_data_repository_associations(AssociationIds=[created[0]["AssociationId"]])
    assert found["Associations"][0]["FileSystemPath"] == "/data"
    assert found["Associations"][0]["DataRepositoryPath"] == "s3://train-bucket/x"
