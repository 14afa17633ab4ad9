"""SIGKILL the whole job at seeded moments inside saves; every resume must pick the last
committed step and reproduce the uninterrupted run's losses.

One chain of runs on one checkpoint directory (and one S3 prefix): each run resumes from what
the previous kill left and is itself killed, so every run both checks a resume and makes the next
kill. Most kills land where the tests' hook (ckpt_pause_hook) holds the process inside a named
phase (writing data, the manifest, the rename, the ``latest`` pointer, uploading data, before the
S3 manifest, before the S3 index); a kill counts as inside its phase only when the hook's marker
shows the process never left it. A few land at a random delay after a save started, with no
hook. The last runs use 2 ranks (torchrun), then a final run completes training and the
replicator drains: every indexed step in S3, downloaded, must match its manifest (and the
committed local files where they still exist), with no multipart upload left open.
"""

from __future__ import annotations

import faulthandler
import json
import random
import signal
import time
import zlib
from pathlib import Path

import pytest

from checkpointing.s3 import S3Location, read_index, read_manifest
from configs.checkpoint_config import S3Config
from ckpt_harness import TINY, Run, committed_steps, losses, resumed_step, run, start, wait_for
from ckpt_pause_hook import left, markers, pause_env
from s3_services import MotoServer

faulthandler.enable()
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SEED = 20261121
STEPS = 100
PRE_COMMIT = ("write_data", "manifest", "rename")  # the step must NOT be committed after the kill
POST_COMMIT = ("latest",)  # renamed: committed even though `latest` still names the previous step
UPLOAD = ("upload_data", "upload_manifest", "index")  # committed locally; S3 incomplete
SINGLE_TRIALS = 21
TWO_RANK_TRIALS = 3
FREE_TRIALS = {4, 9, 15, 19}  # no hook: killed 0-60 ms after a save started
LAYOUT_TOL = 2e-4


def wait_for_new_save(ckpt: Path, job: Run, timeout: float = 120) -> Path:
    """The first ``step_N.tmp`` this run creates (after its start-up removed older leftovers)."""
    deadline = time.monotonic() + timeout
    while "layout:" not in job.text():
        assert job.proc.poll() is None and time.monotonic() < deadline, job.text()[-4000:]
        time.sleep(0.01)
    while time.monotonic() < deadline:
        found = sorted(ckpt.glob("step_*.tmp"))
        if found:
            return found[0]
        assert job.proc.poll() is None, job.text()[-4000:]
        time.sleep(0.002)
    raise AssertionError("no save started")


def test_sigkill_during_saves_always_resumes_from_the_last_commit(tmp_path: Path, moto: MotoServer,
                                                                   bucket: str) -> None:
    rng = random.Random(SEED)
    ckpt = tmp_path / "ckpt"
    args = [*TINY, f"training.train_steps={STEPS}", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
            f"checkpoint.dir={ckpt}", f"checkpoint.s3.bucket={bucket}", "checkpoint.s3.prefix=chain",
            f"checkpoint.s3.endpoint_url={moto.endpoint}"]
    reference = losses(run(tmp_path / "reference", None, [f"training.train_steps={STEPS}", "training.precision=fp32"]))
    assert sorted(reference) == list(range(1, STEPS + 1))

    hooked = [t for t in range(SINGLE_TRIALS + TWO_RANK_TRIALS) if t not in FREE_TRIALS]
    phases = list(PRE_COMMIT + POST_COMMIT + UPLOAD) * 2
    phases += [rng.choice(PRE_COMMIT + POST_COMMIT + UPLOAD) for _ in range(len(hooked) - len(phases))]
    rng.shuffle(phases)
    plan = dict(zip(hooked, phases))

    last_commit = 0
    exact = True  # until a 2-rank run has written a checkpoint
    summary = []
    for trial in range(SINGLE_TRIALS + TWO_RANK_TRIALS):
        nproc = None if trial < SINGLE_TRIALS else 2
        pauses = tmp_path / f"pauses{trial}"
        phase = plan.get(trial, "free")
        env = {}
        if phase != "free":
            target = last_commit + 2 * rng.randint(1, 3)  # a save step of this run
            arm = f"{phase}@{target}" if phase not in UPLOAD else phase  # uploads: the first one this run
            env = pause_env(arm, pauses, hold_s=120)
        job = start(tmp_path / f"run{trial}", nproc, args, env)
        if phase == "free":
            marker = wait_for_new_save(ckpt, job)
            time.sleep(rng.uniform(0.0, 0.06))
        else:
            marker = wait_for((pauses, f"{phase}@*"), job, 120)
            time.sleep(rng.uniform(0.0, 0.05))
        alive = job.proc.poll() is None
        job.kill()
        killed = alive and job.proc.returncode == -signal.SIGKILL
        # inside the phase: killed while the hook held it (its marker has no ".left" companion)
        inside = killed and (phase == "free" or not any(left(m) for m in markers(pauses, phase)))
        text = job.text()
        killed_step = int(marker.name.split("@")[1].split(".")[0]) if phase != "free" else int(marker.name[5:13])

        # this run resumed from the previous kill's last commit, and trained exactly like the reference
        assert resumed_step(text) == (last_commit or None), text[-4000:]
        got = losses(text)
        assert got and min(got) == last_commit + 1, text[-4000:]
        want = {s: reference[s] for s in got}
        assert (got == want) if exact else (got == pytest.approx(want, abs=LAYOUT_TOL)), (trial, got, want)

        commits = committed_steps(ckpt)
        now = max(commits) if commits else 0
        if phase in PRE_COMMIT:
            assert killed_step not in commits and now < killed_step, (phase, killed_step, commits)
        elif phase in POST_COMMIT:
            assert killed_step in commits and now >= killed_step, (phase, killed_step, commits)
            assert (ckpt / "latest").read_text().strip() != f"step_{killed_step:08d}"
        elif phase in UPLOAD:
            assert now >= killed_step, (phase, killed_step, commits)
        summary.append({"trial": trial, "ranks": nproc or 1, "phase": phase, "save_step": killed_step,
                        "resumed_from": last_commit, "steps_checked": len(got), "last_commit_after_kill": now,
                        "killed_inside": inside})
        last_commit = now
        exact = exact and nproc is None
        assert last_commit < STEPS - 10, "the chain ran out of steps"

    final = run(tmp_path / "final", None, args, timeout=300)
    assert resumed_step(final) == last_commit
    got = losses(final)
    assert sorted(got) == list(range(last_commit + 1, STEPS + 1))
    assert got == pytest.approx({s: reference[s] for s in got}, abs=LAYOUT_TOL)
    assert "replicated and verified" in final

    cfg = S3Config(bucket=bucket, prefix="chain", endpoint_url=moto.endpoint)
    client, loc = moto.client(), S3Location.of(cfg)
    index = read_index(client, loc)
    assert index.latest == STEPS
    local_steps = set(committed_steps(ckpt))
    assert STEPS in local_steps
    for step in index.steps:  # downloaded bytes, not metadata the replicator wrote itself
        manifest = read_manifest(client, loc, step)
        for name, entry in manifest.files.items():
            body = client.get_object(Bucket=bucket, Key=loc.step_key(step, name))["Body"].read()
            assert (len(body), f"{zlib.crc32(body):08x}") == (entry.size, entry.crc32), (step, name)
            if step in local_steps:
                assert body == (ckpt / f"step_{step:08d}" / name).read_bytes(), (step, name)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not list(ckpt.glob("step_*.*")), list(ckpt.glob("step_*.*"))  # no temporary leftovers

    by_phase: dict[str, int] = {}  # kills proven to have landed inside their phase
    for item in summary:
        by_phase[item["phase"]] = by_phase.get(item["phase"], 0) + int(item["killed_inside"])
    (tmp_path / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nfault injection: {len(summary)} SIGKILLs, inside their phase by phase {by_phase}")
    for item in summary:
        print("  ", item)
    missed = [item for item in summary if not item["killed_inside"]]
    assert not missed, f"kills that did not land inside their phase: {missed}"
    assert all(by_phase.get(p, 0) >= 2 for p in PRE_COMMIT + POST_COMMIT + UPLOAD), by_phase
