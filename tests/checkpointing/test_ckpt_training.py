"""Real training (megatron-core on CPU ranks, gloo) saving asynchronously and resuming.

Losses after a resume must equal the uninterrupted run's: exactly on the same layout (fp32,
no dropout, deterministic CPU kernels), to the printed 4 decimals (abs 2e-4, as the layout tests)
after a TP/PP/DP change.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from checkpointing.manifest import Manifest
from checkpointing.signature import model_signature
from checkpointing.store import CheckpointStore, step_name
from ckpt_harness import TINY, committed_steps, losses, resumed_step, run, start, wait_for, wait_text
from ckpt_pause_hook import RELEASE, left, pause_env
from s3_services import FaultProxy, MotoServer, free_port
from tests.compose import compose_root

faulthandler.enable()
pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
LAYOUT_TOL = 2e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """8 uninterrupted steps, one process, no checkpointing."""
    text = run(tmp_path_factory.mktemp("ref"), None, ["training.train_steps=8", "training.precision=fp32"])
    return losses(text)


def drop_steps_after(ckpt: Path, keep: int) -> None:
    for step in committed_steps(ckpt):
        if step > keep:
            shutil.rmtree(ckpt / step_name(step))


def test_async_save_snapshot_and_exact_resume(tmp_path: Path, reference: dict[int, float]) -> None:
    """Step 3's files are written while steps 4-8 train (the writer is held inside the write until
    step 5 has trained): the checkpoint must still hold step 3's state, so resuming from it
    reproduces steps 4..8 exactly."""
    ckpt, pauses = tmp_path / "ckpt", tmp_path / "pauses"
    args = [*TINY, "training.train_steps=8", "checkpoint.save_interval=3", f"checkpoint.dir={ckpt}"]
    job = start(tmp_path / "a", None, args, env=pause_env("write_data@3", pauses, hold_s=170))
    marker = wait_for((pauses, "write_data@3.*"), job, 120)
    wait_text(job, "step=5/8", 120)
    assert not left(marker)  # step 5 trained while the write of step 3 was held
    (pauses / RELEASE).touch()
    assert job.wait(120) == 0, job.text()[-6000:]
    first = job.text()
    assert losses(first) == reference
    lines = first.splitlines()
    commit3 = next(i for i, ln in enumerate(lines) if "committed" in ln and "step_00000003" in ln)
    assert any(ln.startswith("step=5/8") for ln in lines[:commit3]), "training did not continue during the write"
    assert committed_steps(ckpt) == [3, 6, 8]  # 3 and 6 asynchronous, 8 the final synchronous save
    assert "training blocked" in first
    drop_steps_after(ckpt, 3)
    second = run(tmp_path / "b", None, args)
    assert resumed_step(second) == 3
    assert losses(second) == {s: v for s, v in reference.items() if s > 3}


def test_two_ranks_distributed_optimizer_async_resume(tmp_path: Path, reference: dict[int, float]) -> None:
    """DP2 with the distributed optimizer and overlapped param gather: the saved model weights must
    be the gathered ones (the overlap otherwise leaves peers' shards stale at save time)."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY, "training.train_steps=8", "checkpoint.save_interval=2", f"checkpoint.dir={ckpt}"]
    first = run(tmp_path / "a", 2, args)
    assert losses(first) == pytest.approx(reference, abs=LAYOUT_TOL)
    drop_steps_after(ckpt, 4)
    second = run(tmp_path / "b", 2, args)
    assert resumed_step(second) == 4
    assert losses(second) == {s: v for s, v in losses(first).items() if s > 4}  # same layout: exact


def test_save_tp2_resume_tp1_and_pp2(tmp_path: Path, reference: dict[int, float]) -> None:
    """Periodic saves in the format any layout loads (optimizer_format=fully_reshardable)."""
    ckpt = tmp_path / "tp2"
    base = [*TINY, "training.train_steps=8", "checkpoint.save_interval=4", "checkpoint.optimizer_format=fully_reshardable"]
    saved = run(tmp_path / "save", 2, [*base, "parallelism.tp=2", f"checkpoint.dir={ckpt}"])
    assert losses(saved) == pytest.approx(reference, abs=LAYOUT_TOL)
    drop_steps_after(ckpt, 4)
    for name, nproc, layout in (("tp1", None, []), ("pp2", 2, ["parallelism.pp=2"])):
        copy = tmp_path / f"ckpt_{name}"
        shutil.copytree(ckpt, copy)
        text = run(tmp_path / name, nproc, [*base, *layout, f"checkpoint.dir={copy}"])
        assert resumed_step(text) == 4 and "resharded from" in text, text[-3000:]
        after = losses(text)
        assert sorted(after) == [5, 6, 7, 8]
        assert after == pytest.approx({s: v for s, v in reference.items() if s > 4}, abs=LAYOUT_TOL), name


def test_auto_format_periodic_saves_stay_on_their_layout_final_save_reshards(tmp_path: Path) -> None:
    """optimizer_format=auto: periodic saves are dp_reshardable (cheap), the final save fully_reshardable.
    A layout change from a periodic save is refused at start-up, naming the field and the fix; from the
    final save it reshards."""
    ckpt = tmp_path / "ckpt"
    base = [*TINY, "training.train_steps=6", "checkpoint.save_interval=3", f"checkpoint.dir={ckpt}"]
    run(tmp_path / "save", 2, [*base, "parallelism.tp=2"])
    formats = {s: Manifest.from_json((ckpt / step_name(s) / "manifest.json").read_text()).optimizer_format
               for s in committed_steps(ckpt)}
    assert formats == {3: "dp_reshardable", 6: "fully_reshardable"}
    final = tmp_path / "final"
    shutil.copytree(ckpt, final)
    text = run(tmp_path / "tp1", None, [*TINY, "training.train_steps=8", "checkpoint.save_interval=3",
                                         f"checkpoint.dir={final}"])
    assert resumed_step(text) == 6 and "resharded from" in text and sorted(losses(text)) == [7, 8], text[-3000:]
    drop_steps_after(ckpt, 3)
    refused = run(tmp_path / "refused", None, base, expect_rc=2, timeout=120)
    assert "parallelism.tp = 1" in refused and "dp_reshardable" in refused and "parallelism.tp=2" in refused, refused
    assert "Traceback" not in refused
    again = run(tmp_path / "same", 2, [*base, "parallelism.tp=2"])  # the layout that saved it: resumes
    assert resumed_step(again) == 3 and sorted(losses(again)) == [4, 5, 6]


def test_fetch_from_s3_when_the_shared_filesystem_has_none(tmp_path: Path, moto: MotoServer, bucket: str,
                                                          reference: dict[int, float]) -> None:
    ckpt = tmp_path / "ckpt"
    args = [*TINY, "training.train_steps=8", "checkpoint.save_interval=2", f"checkpoint.dir={ckpt}",
            f"checkpoint.s3.bucket={bucket}", "checkpoint.s3.prefix=runs/fetch",
            f"checkpoint.s3.endpoint_url={moto.endpoint}", "checkpoint.keep_last=1"]
    first = run(tmp_path / "a", None, args)
    assert "replicated and verified" in first and committed_steps(ckpt) == [8]  # local retention: keep 1
    client = moto.client()
    # S3 lost its newest step's manifest (as if the job died before that upload), and the index
    client.delete_object(Bucket=bucket, Key=f"runs/fetch/{step_name(8)}/manifest.json")
    client.delete_object(Bucket=bucket, Key="runs/fetch/index.json")
    shutil.rmtree(ckpt)  # the shared filesystem has nothing (a new cluster)
    second = run(tmp_path / "b", None, args)
    assert "fetching s3://" in second and f"fetched {step_name(6)} from S3" in second, second[-3000:]
    assert resumed_step(second) == 6
    assert losses(second) == {s: v for s, v in reference.items() if s > 6}
    # the only local step fails its CRC check (same size, other bytes): S3's copy, not step 0
    data = next(p for p in sorted((ckpt / step_name(8)).glob("*.distcp")) if p.stat().st_size > 0)
    data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
    third = run(tmp_path / "c", None, args)
    assert "crc32" in third and f"fetched {step_name(8)} from S3" in third, third[-3000:]
    assert resumed_step(third) == 8


def test_sigterm_saves_after_the_step_and_resume_continues(tmp_path: Path) -> None:
    """SIGTERM to the whole local job (what `launcher cancel` sends): every rank stops after the
    same step, the step is saved synchronously, and a new run continues from it."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY, "training.train_steps=14", "checkpoint.save_interval=0", f"checkpoint.dir={ckpt}"]
    job = start(tmp_path / "a", 2, args)
    wait_for((tmp_path / "a", "out.log"), job, 60)
    deadline = time.monotonic() + 120
    while "step=3/14" not in job.text():
        assert job.proc.poll() is None and time.monotonic() < deadline, job.text()[-3000:]
        time.sleep(0.05)
    os.killpg(job.proc.pid, signal.SIGTERM)
    job.wait(90)
    text = job.text()
    assert "SIGTERM received: saving after this step" in text, text[-3000:]
    stopped = max(losses(text))
    assert committed_steps(ckpt) == [stopped] and stopped < 14
    assert "training finished" not in text
    full = losses(run(tmp_path / "ref", 2, [*args[:-2], "checkpoint.enabled=false"]))
    resumed = run(tmp_path / "b", 2, args, timeout=240)
    assert resumed_step(resumed) == stopped
    assert losses(resumed) == {s: v for s, v in full.items() if s > stopped}


def test_s3_outage_at_resume_stops_instead_of_starting_over(tmp_path: Path) -> None:
    """The only checkpoint is in S3, and S3 dies while resume downloads it (after the start-up checks
    passed): every step looks unreadable, which is not "no checkpoint". The run must stop, non-zero,
    naming the endpoint, and never train from step 1 (nor replicate or prune anything)."""
    server = MotoServer(tmp_path / "moto").start()
    try:
        server.client().create_bucket(Bucket="ckpt-outage")
        ckpt = tmp_path / "ckpt"
        args = [*TINY, "training.train_steps=4", "checkpoint.save_interval=2", f"checkpoint.dir={ckpt}",
                "checkpoint.s3.bucket=ckpt-outage", "checkpoint.s3.prefix=runs/outage", "checkpoint.s3.max_attempts=2",
                "checkpoint.s3.final_upload_timeout_s=5"]
        first = run(tmp_path / "a", None, [*args, f"checkpoint.s3.endpoint_url={server.endpoint}"])
        assert "replicated and verified" in first
        shutil.rmtree(ckpt)  # S3 only (a new cluster, or the shared filesystem was lost)
        data = lambda method, path: "/step_" in path and not path.split("?")[0].endswith("manifest.json")  # noqa: E731
        with FaultProxy(server.port, cut_when=data, on_cut=server.kill) as proxy:
            out = run(tmp_path / "b", None, [*args, f"checkpoint.s3.endpoint_url={proxy.endpoint}"], expect_rc=75)
            assert proxy.cut.is_set()  # S3 went away during the fetch, not before it
        assert "Traceback" not in out, out[-3000:]  # one error line, exit 75 (EX_TEMPFAIL: run again later)
        assert f"cannot fetch a checkpoint (3 attempts) from s3://ckpt-outage/runs/outage at {proxy.endpoint}" in out
        assert "the run stops here instead of training from step 0" in out and "retrying in" in out, out[-3000:]
        assert "step=1/" not in out and "starting from scratch" not in out, out[-3000:]
        assert "replicate:" not in out and committed_steps(ckpt) == []  # no replicator, no save, no retention
    finally:
        server.kill()


# ------------------------------------------------------------------------- bad input, before training


def fabricate_checkpoint(ckpt: Path, hidden_size: int) -> None:
    store = CheckpointStore(str(ckpt))
    store.prepare(5)
    sig = {**model_signature(compose_root().model), "hidden_size": hidden_size}
    store.commit(5, Manifest(step=5, files={}, consumed_samples=40, model=sig, layout={},
                             training={"global_batch_size": 8}))


@pytest.fixture
def auth_moto(tmp_path: Path):
    server = MotoServer(tmp_path / "auth-moto", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    yield server
    server.kill()


@pytest.mark.parametrize("case", ["unwritable_dir", "unmounted_dir", "missing_bucket", "wrong_credentials",
                                  "unreachable_endpoint", "incompatible_model", "malformed_hook"])
def test_bad_input_fails_at_start_up_naming_the_setting(tmp_path: Path, case: str, request: pytest.FixtureRequest) -> None:
    ckpt = tmp_path / "ckpt"
    args = [*TINY, "training.train_steps=2", f"checkpoint.dir={ckpt}"]
    env: dict[str, str] = {}
    if case == "unwritable_dir":
        (tmp_path / "file").write_text("x")
        args[-1], field, text = f"checkpoint.dir={tmp_path / 'file' / 'ckpt'}", "checkpoint.dir", "not writable"
    elif case == "unmounted_dir":  # /fsx/checkpoints/run with nothing mounted on /fsx
        args[-1], field, text = f"checkpoint.dir={tmp_path / 'fsx' / 'ckpt'}", "checkpoint.dir", "mounted"
    elif case == "malformed_hook":  # a fault-injection setting that would otherwise fail deep inside a save
        env = pause_env("write_data@three", tmp_path / "pauses")
        field, text = "HYPERLAUNCH_CKPT_HOOK", "write_data@three"
    elif case == "missing_bucket":
        moto = request.getfixturevalue("moto")
        args += ["checkpoint.s3.bucket=no-such-bucket", f"checkpoint.s3.endpoint_url={moto.endpoint}"]
        field, text = "checkpoint.s3.bucket", "does not exist"
    elif case == "wrong_credentials":
        server = request.getfixturevalue("auth_moto")
        args += ["checkpoint.s3.bucket=some-bucket", f"checkpoint.s3.endpoint_url={server.endpoint}"]
        field, text = "checkpoint.s3.bucket", "credentials from the environment were rejected"
    elif case == "unreachable_endpoint":
        args += ["checkpoint.s3.bucket=some-bucket", f"checkpoint.s3.endpoint_url=http://127.0.0.1:{free_port()}"]
        field, text = "checkpoint.s3.endpoint_url", "cannot reach S3"
    else:
        fabricate_checkpoint(ckpt, hidden_size=32)
        field, text = "model.hidden_size", "hidden_size=32"
    t0 = time.monotonic()
    out = run(tmp_path / "run", None, args, env=env, expect_rc=2, timeout=120)
    assert f"{field} = " in out and text in out, out[-3000:]
    assert "Traceback" not in out and "layout:" not in out, out[-3000:]
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "fsx").exists()  # nothing was created where a filesystem should be mounted
