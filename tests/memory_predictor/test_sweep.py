"""Benchmark sweep: log parsing and the report (unit), and a real sweep on the single-node Slurm.

The real sweep emulates "several node counts" with 1 and 2 training processes on the one
test node (``--points 1x1,1x2``): CPU processes over gloo, the tiny model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from launcher import sweep
from tests.e2e import launcher

STEP = ("step={i}/6 loss=5.0 grad_norm=1.000 lr=1.000e-03 step_time_s={t:.3f} tokens_per_s={tps:.1f} "
        "tflops_per_gpu=0.005 mfu=n/a")


def _fake_run(root: Path, name: str, gpus: int, step_times: list[float], predicted_tps: float) -> dict:
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "job.json").write_text(json.dumps({"backend": "local", "state": "COMPLETED"}))
    lines = [f"0: {STEP.format(i=i + 1, t=t, tps=512 / t)}" for i, t in enumerate(step_times)]  # srun --label
    lines.append("memory: kind=cuda max_peak_allocated_bytes=1000 max_peak_reserved_bytes=1200")
    (run / "logs" / "local.out").write_text("\n".join(lines) + "\n")
    peak = {"allocated": 1100, "reserved": 1155, "total": 2000}
    (run / "prediction.json").write_text(json.dumps({"tokens_per_s": predicted_tps, "tflops_per_gpu": 0.01,
                                                     "step_time_s": 0.1, "peak_bytes": 2000, "fits": True,
                                                     "breakdown": {"peak": peak}}))
    return {"run_dir": str(run), "name": name, "nodes": 1, "procs_per_node": gpus, "gpus": gpus, "rank": 1,
            "layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": gpus, "mbs": 1, "recompute": "none",
                       "distributed_optimizer": True}}


def test_report_medians_ratios_and_scaling(tmp_path: Path, monkeypatch) -> None:
    runs = [_fake_run(tmp_path, "a", 1, [9.0, 1.0, 1.0, 2.0, 1.0, 1.0], 600.0),
            _fake_run(tmp_path, "b", 2, [9.0, 0.6, 0.5, 0.5, 0.5, 0.7], 1000.0)]
    (tmp_path / sweep.SWEEP_FILE).write_text(json.dumps({"runs": runs, "emulated": True, "gpu_type": "h100-80gb"}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the report must not need it
    report = sweep.build_report(tmp_path, skip=2)
    a, b = report["runs"]
    assert a["measured"]["step_time_s"] == 1.0 and a["measured"]["tokens_per_s"] == 512.0  # median after 2 steps
    assert a["measured"]["peak_allocated_bytes"] == 1000 and a["ratio_memory"] == pytest.approx(1.1)
    assert a["ratio_tokens_per_s"] == pytest.approx(600 / 512)
    first, second = report["scaling"]
    assert second["measured_efficiency"] == pytest.approx((1024 / 2) / 512)
    assert second["predicted_efficiency"] == pytest.approx((1000 / 2) / 600)
    assert report["plot"] is None
    md = (tmp_path / sweep.REPORT_MD).read_text()
    assert "emulated" in md and "| a | 1x1 |" in md and "| 2 | 1 |" in md
    assert json.loads((tmp_path / sweep.REPORT_JSON).read_text())["runs"][1]["name"] == "b"


def test_bad_points_and_missing_sweep_dir(tmp_path: Path) -> None:
    proc = launcher("sweep", "--points", "1x0", "--", "config=tiny_local", f"runs_root={tmp_path}")
    assert proc.returncode == 2 and "points and --top-k must be positive" in proc.stderr
    proc = launcher("sweep", "--report", str(tmp_path))
    assert proc.returncode == 2 and "is not a sweep directory" in proc.stderr


@pytest.mark.slurm
@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_sweep_on_real_slurm(slurm, tmp_path: Path) -> None:
    overrides = ["config=tiny_local", "cluster=slurm", "cluster.gpu_type=cpu", "cluster.gpus_per_node_flag=false",
                 f"cluster.python={sys.executable}", "cluster.time_limit=00:10:00", "cluster.signal_seconds=60",
                 f"runs_root={tmp_path}"]
    proc = launcher("sweep", "--points", "1x1,1x2", "--top-k", "2", "--steps", "6", "--skip", "2", "--timeout", "360",
                    "--calibrate", "--", *overrides, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sweep_dir = next((tmp_path / "sweeps").iterdir())
    report = json.loads((sweep_dir / sweep.REPORT_JSON).read_text())
    runs = report["runs"]
    assert [r["procs_per_node"] for r in runs] == [1, 2, 2]  # 1 process: one layout; 2 processes: the top 2
    for r in runs:
        m = r["measured"]
        assert m["state"] == "COMPLETED" and m["steps_logged"] == 6 and m["tokens_per_s"] > 0
        assert m["memory_kind"] == "cpu_max_rss"
        assert r["predicted"]["tokens_per_s"] > 0 and r["ratio_tokens_per_s"] > 0
        # CPU memory: predicted process total vs max RSS; the runtime base dominates, within 30%
        assert 0.7 < r["ratio_memory"] < 1.3
        assert Path(r["run_dir"], "logs").is_dir() and Path(r["run_dir"], "job.sbatch").exists()
    assert [s["gpus"] for s in report["scaling"]] == [1, 2]
    assert "Benchmark sweep: predicted vs measured" in proc.stdout
    if report.get("plot"):
        assert (sweep_dir / sweep.SCALING_PNG).read_bytes()[:4] == b"\x89PNG"
    # short benchmark runs -> calibration (from the Slurm logs, srun --label prefixes) -> the next plan
    calibration = yaml.safe_load((sweep_dir / sweep.CALIBRATION_FILE).read_text())
    assert calibration["gpu_type"] == "cpu" and len(calibration["runs"]) == 3 and "compute" in calibration["fitted"]
    assert "step-time error" in proc.stdout and "cluster.calibration=" in proc.stdout
    assert Path(runs[0]["run_dir"], "plan.html").exists()
