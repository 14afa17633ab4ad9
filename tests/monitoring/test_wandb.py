"""W&B, offline, read back from its own files (`wandb leet inspect --json`).

* A requeued job resumes its W&B run and logs again the steps after its last checkpoint. What a
  W&B server keeps of that is modelled from wandb-core's rules (docs/monitoring.md "W&B"):
  a resumed run starts at the server's last ``_step`` + 1; online, a row logged with ``step=``
  below it is dropped ("Tried to log to step ... that is less than the current step"); ``wandb
  sync`` of an offline segment renumbers such rows. A metric is charted at its ``step_metric``
  (define_metric) when it has one, else at ``_step``.
* A run whose error and log carry WANDB_API_KEY: no alert, console line or W&B file may hold it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from monitoring.events import CheckpointEvent, Operation
from tests.monitoring.conftest import ROOT, wandb_records

SEGMENTS = textwrap.dedent('''
    import sys
    from configs.monitoring_config import MonitoringConfig
    from monitoring.events import Outcome, RunInfo, StepSample
    from monitoring.wandb_sink import WandbSink

    wdir = sys.argv[1]
    cfg = MonitoringConfig(wandb=True, wandb_mode="offline", wandb_dir=wdir, wandb_project="p")
    for first, last in ((1, 10), (6, 10)):  # the second attempt, requeued, resumes from the step-5 checkpoint
        sink = WandbSink(cfg, {}, log_interval=1, report=lambda k, m: print(k, m))
        sink.start(RunInfo(run="requeue-test", run_name="requeue-test", world_size=1, total_steps=10, run_dir=wdir))
        for s in range(first, last + 1):
            sink.step(StepSample(step=s, total_steps=10, loss=100.0 * first + s, grad_norm=None, lr=1e-4,
                                 step_time_s=1.0, tokens_per_s=1.0, tokens=1, tflops_per_gpu=1.0, mfu_percent=None,
                                 compute_s=1.0, data_wait_s=0.0))
        sink.finish(Outcome("finished", last))
''')


def server_chart(segments: list[list[dict]], metric: str, online: bool) -> dict[float, float]:
    """x -> the value of ``metric`` a W&B server charts after the segments arrive in order."""
    step_metric = None
    rows: list[dict] = []
    next_step = 0  # a resumed segment starts at the server's last _step + 1
    for n, recs in enumerate(segments):
        for r in recs:
            m = r.get("metric") or {}
            if (m.get("name") == metric or m.get("glob_name") == "*") and m.get("step_metric"):
                step_metric = m["step_metric"]
        explicit = any(r.get("telemetry", {}).get("feature", {}).get("set_step_log") for r in recs)  # log(step=)
        for r in recs:
            if r.get("type") != "history":
                continue
            item = dict(r["history"]["item"])
            step = int(item["_step"])
            if n and step < next_step:
                if online and explicit:
                    continue  # dropped: "Tried to log to step ... less than the current step"
                step = next_step  # auto-step online, renumbered by `wandb sync`
            item["_step"] = step
            next_step = max(next_step, step + 1)
            rows.append(item)
    chart: dict[float, float] = {}
    for item in sorted(rows, key=lambda i: i["_step"]):
        x = item.get(step_metric) if step_metric else item["_step"]
        if metric in item and x is not None:
            chart[float(x)] = float(item[metric])
    return chart


def test_requeued_steps_are_charted_at_their_training_step(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONPATH"] = str(ROOT)
    # both attempts in one process (a fresh sink and wandb.init each, as after a requeue): the files are the same
    out = subprocess.run([sys.executable, "-c", SEGMENTS, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2
    segments = [wandb_records(d) for d in dirs]
    for online in (True, False):
        chart = server_chart(segments, "train/loss", online)
        expected = {float(s): (100.0 + s if s < 6 else 600.0 + s) for s in range(1, 11)}
        assert chart == expected, f"{'online' if online else 'offline, then wandb sync'}: {chart}"
    rows = [r["history"]["item"] for r in segments[1] if r["type"] == "history"]
    assert [int(r["train/step"]) for r in rows] == [6, 7, 8, 9, 10]


KEY = "0123456789abcdef0123456789abcdef01234567"


def test_wandb_api_key_never_reaches_alerts_console_or_wandb_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """The error, the checkpoint failure and the log tail all carry the key: only redaction keeps it out."""
    from configs.schema import RootConfig
    from monitoring.training import MonitoringCallback

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("HYPERLAUNCH_RUN_DIR", str(tmp_path))
    for name in [n for n in os.environ if n.startswith("WANDB_") and n != "WANDB_API_KEY"]:
        monkeypatch.delenv(name)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "local.out").write_text(f"step=2/5 loss=9.1\nwandb: using WANDB_API_KEY={KEY}\n")
    cfg = RootConfig()  # the schema's defaults (no Hydra composition needed here)
    cfg.monitoring.wandb, cfg.monitoring.wandb_mode, cfg.cluster.secret_env = True, "offline", ["WANDB_API_KEY"]
    # the loop's Layout, TrainState and StepReport by their fields (importing trainer pulls in megatron: 10 s)
    layout = SimpleNamespace(rank=0, world_size=1, local_rank=0, gloo=True, dp_rank=0, dp_size=1, tp_rank=0, pp_rank=0)
    callback = MonitoringCallback(cfg, layout)  # type: ignore[arg-type]
    state = SimpleNamespace(step=0, total_steps=5)
    callback.on_train_start(state)  # type: ignore[arg-type]
    for step in (1, 2):
        state.step = step
        callback.on_step_end(state, SimpleNamespace(  # type: ignore[arg-type]
            step=step, total_steps=5, loss=9.0, grad_norm=1.0, lr=1e-4, step_time_s=0.1, tokens_per_s=1000.0,
            tflops_per_gpu=1.0, mfu_percent=None, compute_s=0.05, data_wait_s=0.001, run=None, notices=()))
    callback.record_checkpoint(CheckpointEvent(Operation.SAVE, 2, 1.5, ok=False,
                                               error=f"PutObject denied for https://user:{KEY}@bucket/x"))
    error = PermissionError(f"W&B refused the API key {KEY}")
    callback.on_train_end(state, finished=False, error=error)  # type: ignore[arg-type]
    console = capsys.readouterr()

    alerts = {r["alert"]["title"]: r["alert"]["text"] for r in wandb_records(next((tmp_path / "wandb").glob("offline-run-*")))
              if r["type"] == "alert"}
    assert {"Job started", "Checkpoint save failing", "Job failed"} <= set(alerts), alerts
    failed = alerts["Job failed"]
    # the key was there to leak: in the reason, the traceback and the log tail, each now redacted
    assert "W&B refused the API key [redacted]" in failed and "WANDB_API_KEY=[redacted]" in failed, failed
    assert "https://user:[redacted]@bucket/x" in alerts["Checkpoint save failing"]
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()
             and p != tmp_path / "logs" / "local.out"]
    assert not leaks, f"the W&B API key is in {leaks}"
    assert KEY not in console.out + console.err
    assert "Job failed" in console.out
