"""Calibration from past runs: log parsing, the fit, the file, --calibration / cluster.calibration, and
real local CPU runs whose calibration predicts a held-back run better than the shipped constants."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from launcher import sweep
from memory_predictor import constants as C
from memory_predictor.calibration import Calibration, Sample, calibration_from_dict, calibration_yaml, \
    fit_calibration, read_calibration, start_values
from memory_predictor.cli import main
from memory_predictor.errors import PredictorError
from memory_predictor.models import load_model
from memory_predictor.records import evaluation_json
from memory_predictor.runs import RunInputs, inputs_json, parse_log, read_run
from memory_predictor.search import evaluate
from memory_predictor.spec import Layout, Options, TrainSpec, hardware
from tests.e2e import launcher, only_run

TINY = load_model("tiny")
CPU_OPTS = Options.cpu_trainer(precision="fp32")
STEP = "step={i}/{n} loss=5.0 grad_norm=1.000 lr=1.000e-03 step_time_s={t:.4f} tokens_per_s={tps:.1f} " \
       "tflops_per_gpu=0.005 mfu=n/a"


def tiny_inputs(procs: int, mbs: int, gbs: int = 8, **layout: int) -> RunInputs:
    lay = Layout(sequence_parallel=layout.get("tp", 1) > 1, **{"dp": procs // (layout.get("tp", 1) * layout.get("pp", 1)),
                                                               **layout})
    return RunInputs(model=TINY, train=TrainSpec(seq_length=64, micro_batch_size=mbs, global_batch_size=gbs),
                     layout=lay, opts=CPU_OPTS, hw=hardware("cpu", nodes=1, gpus_per_node=procs))


#: A made-up CPU cluster: what the fit must recover from runs "measured" on it.
TRUTH = replace(start_values("cpu"), compute=0.6, gemm_half_flops=8e5, nvlink_latency_s=1.5e-3,
                host_process_bytes=470 * 10**6)
CASES = {"one-mbs1": tiny_inputs(1, 1), "one-mbs4": tiny_inputs(1, 4), "tp2-mbs2": tiny_inputs(2, 2, tp=2),
         "dp2-mbs1": tiny_inputs(2, 1), "pp2-mbs2": tiny_inputs(2, 2, pp=2), "one-mbs2-gbs16": tiny_inputs(1, 2, 16)}


def measured_on(cal: Calibration, i: RunInputs) -> tuple[float, int]:
    report, step = evaluate(i.model, i.train, i.layout, i.opts, i.hw, eff=cal.efficiency(), overheads=cal.overheads())
    return step.step_time_s, report.peak.total


def fake_run(root: Path, name: str, i: RunInputs, step_time: float, rss: int, *, label: bool = False) -> Path:
    """A run directory as the launcher and the trainer leave it."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"backend": "local", "state": "COMPLETED"}))
    record = evaluation_json(i.model, i.train, i.layout, i.opts, i.hw)
    record["inputs"] = inputs_json(i.model, i.train, i.layout, i.opts, i.hw)
    (run / "prediction.json").write_text(json.dumps(record))
    tokens = i.train.global_batch_size * i.train.seq_length
    lines = [("0: " if label else "") + STEP.format(i=k, n=8, t=step_time * (3 if k == 1 else 1), tps=tokens / step_time)
             for k in range(1, 9)]
    lines.append(f"memory: kind=cpu_max_rss max_peak_allocated_bytes={rss} max_peak_reserved_bytes={rss}")
    (run / "logs" / "local.out").write_text("\n".join(lines) + "\n")
    return run


# --------------------------------------------------------------------------- the logs


def test_parse_log_medians_labels_extra_fields_and_requeues() -> None:
    lines = ["0: " + STEP.format(i=1, n=5, t=9.0, tps=1.0), "0: " + STEP.format(i=2, n=5, t=1.0, tps=10.0),
             STEP.format(i=3, n=5, t=2.0, tps=5.0) + " progress=60.0% eta_s=12",  # a line with more fields
             "step=4/5 loss=nan step_time_s=3.0 tokens_per_s=4.0", "validation step=4 val_loss=1.0",
             "memory: kind=cuda max_peak_allocated_bytes=100 max_peak_reserved_bytes=120",
             "1: memory: kind=cuda max_peak_allocated_bytes=300 max_peak_reserved_bytes=330"]  # after a requeue
    m = parse_log(lines, skip=1)
    assert m.steps_logged == 4 and m.step_times == (9.0, 1.0, 2.0, 3.0)
    assert m.step_time_s == 2.0 and m.tokens_per_s == 5.0 and m.tflops_per_gpu == pytest.approx(0.005)
    assert (m.memory_kind, m.peak_allocated_bytes, m.peak_reserved_bytes) == ("cuda", 300, 330)
    assert parse_log(lines[:1], skip=5).step_time_s == 9.0  # fewer steps than skip: all of them
    assert parse_log(["no steps"], skip=2).step_time_s is None


# --------------------------------------------------------------------------- the fit


def test_fit_recovers_a_known_cpu_cluster() -> None:
    samples = []
    for name, i in CASES.items():
        step, total = measured_on(TRUTH, i)
        samples.append(Sample(name=name, inputs=i, step_time_s=step, memory_kind="cpu_max_rss",
                              peak_allocated_bytes=total, peak_reserved_bytes=total, held_out=name == "one-mbs2-gbs16"))
    result = fit_calibration(samples, "cpu")
    cal = result.calibration
    assert set(cal.fitted) == {"compute", "gemm_half_flops", "nvlink", "nvlink_latency_s", "host_process_bytes"}
    assert cal.compute == pytest.approx(TRUTH.compute, rel=0.05)
    assert cal.gemm_half_flops == pytest.approx(TRUTH.gemm_half_flops, rel=0.05)
    assert cal.nvlink_latency_s == pytest.approx(TRUTH.nvlink_latency_s, rel=0.05)
    assert cal.host_process_bytes == pytest.approx(TRUTH.host_process_bytes, rel=0.001)
    err = cal.step_time_error or {}
    assert err["held_out_after"] < 0.02 < 0.5 < err["held_out_before"]
    assert cal.runs == tuple(n for n in CASES if n != "one-mbs2-gbs16") and cal.held_out == ("one-mbs2-gbs16",)


def test_fit_on_gpu_runs_refits_compute_network_and_allocator_margin() -> None:
    l8 = load_model("llama3.1_8b")
    truth = replace(start_values("h100-80gb"), compute=0.55, network=0.4, allocator_margin_fraction=0.12)
    samples = []
    for k, (nodes, tp, mbs) in enumerate([(1, 1, 1), (1, 2, 2), (2, 1, 1), (4, 2, 1), (2, 4, 2)]):
        hw = hardware("h100-80gb", nodes=nodes)
        i = RunInputs(model=l8, train=TrainSpec(seq_length=8192, micro_batch_size=mbs, global_batch_size=64 * nodes),
                      layout=Layout(tp=tp, dp=hw.world // tp, sequence_parallel=tp > 1), opts=Options(), hw=hw)
        report, step = evaluate(i.model, i.train, i.layout, i.opts, i.hw, eff=truth.efficiency(),
                                overheads=truth.overheads())
        samples.append(Sample(name=f"r{k}", inputs=i, step_time_s=step.step_time_s, memory_kind="cuda",
                              peak_allocated_bytes=report.peak.allocated,
                              peak_reserved_bytes=int(report.peak.allocated * 1.12)))
    cal = fit_calibration(samples, "h100-80gb").calibration
    assert {"compute", "network", "allocator_margin_fraction"} <= set(cal.fitted)
    assert cal.compute == pytest.approx(0.55, rel=0.05) and cal.allocator_margin_fraction == pytest.approx(0.12)
    assert (cal.step_time_error or {})["fitted_after"] < 0.01
    # applied: this family's numbers change, the others do not
    eff = cal.efficiency()
    assert eff.compute_for("h100-80gb") == cal.compute and eff.compute_for("a100-80gb") == C.EFFICIENCY.compute["a100"]


def test_fit_needs_timed_runs_of_one_type() -> None:
    i = CASES["one-mbs1"]
    with pytest.raises(PredictorError, match="no finished run with step times"):
        fit_calibration([Sample(name="a", inputs=i, step_time_s=None)], "cpu")
    with pytest.raises(PredictorError, match="measured on gpu_type=cpu, not h100-80gb"):
        fit_calibration([Sample(name="a", inputs=i, step_time_s=0.1)], "h100-80gb")


# --------------------------------------------------------------------------- the file


def test_calibration_file_round_trip_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "cal.yaml"
    path.write_text(calibration_yaml(replace(TRUTH, fitted=("compute",), runs=("a",)), "made in a test"))
    assert "# made in a test" in path.read_text()
    back = read_calibration(str(path))
    assert back == replace(TRUTH, fitted=("compute",), runs=("a",))
    data = yaml.safe_load(path.read_text())
    data["efficiency"]["compute"] = -1
    data["efficiency"]["network"] = 2.0
    data["version"] = 7
    with pytest.raises(PredictorError) as info:
        calibration_from_dict(data, "x")
    fields = {p.field for p in info.value.problems}
    assert fields == {"calibration.efficiency.compute", "calibration.efficiency.network", "calibration.version"}
    with pytest.raises(PredictorError, match="is not a calibration file"):
        calibration_from_dict({"a": 1}, "x")
    with pytest.raises(PredictorError, match="cannot be read"):
        read_calibration(str(tmp_path / "missing.yaml"))
    assert TRUTH.problems_for("h100-80gb", "gpu")[0].fix.startswith("the calibration was measured on gpu_type=cpu")


# --------------------------------------------------------------------------- the command lines


def _cal_file(tmp_path: Path, cal: Calibration = TRUTH) -> Path:
    path = tmp_path / "cluster_calibration.yaml"
    path.write_text(calibration_yaml(cal))
    return path


def test_calibrate_cli_on_run_directories(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    for k, (name, i) in enumerate(CASES.items()):
        step, total = measured_on(TRUTH, i)
        fake_run(runs, name, i, step, total, label=k % 2 == 1)
    (runs / "not-a-run").mkdir()
    out = tmp_path / "cal.yaml"
    assert main(["calibrate", "--runs", str(runs), "--out", str(out), "--hold-out", "one-mbs2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["calibration"]["held_out"] == ["one-mbs2-gbs16"] and len(d["runs"]) == 6
    held = next(r for r in d["runs"] if r["held_out"])
    assert abs(held["after_error"]) < 0.02 < abs(held["before_error"])
    assert read_calibration(str(out)).compute == pytest.approx(TRUTH.compute, rel=0.05)
    assert main(["calibrate", "--runs", str(runs), "--out", str(out)]) == 0  # the table
    text = capsys.readouterr().out
    assert "step-time error" in text and "--calibration" in text and "cluster.calibration=" in text
    assert main(["calibrate", "--runs", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "holds no run directories" in capsys.readouterr().err


def test_calibration_changes_evaluate_search_and_plan(tmp_path: Path, capsys) -> None:
    path = _cal_file(tmp_path)
    args = ["--model", "tiny", "--gpu", "cpu", "--gpus-per-node", "2", "--seq", "64", "--gbs", "8", "--precision",
            "fp32", "--json"]
    assert main(["evaluate", *args, "--tp", "2", "--mbs", "2"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert main(["evaluate", *args, "--tp", "2", "--mbs", "2", "--calibration", str(path)]) == 0
    calibrated = json.loads(capsys.readouterr().out)
    step, total = measured_on(TRUTH, CASES["tp2-mbs2"])
    assert calibrated["step_time_s"] == pytest.approx(step) != pytest.approx(shipped["step_time_s"])
    assert calibrated["peak_bytes"] == total
    assert main(["plan", *args, "--nodes", "1", "--steps", "100", "--calibration", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["best"]["step_time_s"] == pytest.approx(plan["step_time_s"])
    rc = main(["search", "--model", "tiny", "--gpu", "h100-80gb", "--seq", "64", "--gbs", "8", "--nodes", "1",
               "--calibration", str(path)])
    assert rc == 2 and "measured on gpu_type=cpu" in capsys.readouterr().err


def test_launcher_uses_cluster_calibration(tmp_path: Path) -> None:
    path = _cal_file(tmp_path)
    base = ["config=tiny_local", "dry_run=true", "cluster.gpus_per_node=2"]
    proc = launcher(*base, "parallelism=auto", f"cluster.calibration={path}", f"runs_root={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr
    assert f"calibrated by {path}" in proc.stdout
    prediction = json.loads((only_run(tmp_path / "a") / "prediction.json").read_text())
    recorded = prediction["calibration"]
    assert recorded["source"] == str(path) and recorded["efficiency"]["compute"] == TRUTH.compute
    i = read_run(only_run(tmp_path / "a")).inputs
    assert prediction["step_time_s"] == pytest.approx(measured_on(TRUTH, i)[0])
    assert prediction["plan_inputs"]["steps"] == 30 and (only_run(tmp_path / "a") / "plan.html").exists()
    failures = prediction["plan_inputs"]["failures"]  # a CPU run's costs, the run's own watchdog settings
    assert failures["restart_s"] == C.CPU_RESTART_S and failures["checkpoint_stall_s"] == C.CPU_CHECKPOINT_STALL_S
    assert failures["detection_floor_s"] == 60.0 and failures["failures_per_gpu_hour"] == C.FAILURES_PER_GPU_HOUR
    proc = launcher(*base, f"cluster.calibration={tmp_path / 'missing.yaml'}", f"runs_root={tmp_path / 'b'}")
    assert proc.returncode == 2 and "cluster.calibration" in proc.stderr and "cannot be read" in proc.stderr
    (tmp_path / "gpu").mkdir()
    gpu = _cal_file(tmp_path / "gpu", replace(TRUTH, gpu_type="h100-80gb", compute=0.5))
    proc = launcher(*base, f"cluster.calibration={gpu}", f"runs_root={tmp_path / 'c'}")
    assert proc.returncode == 2 and "measured on gpu_type=h100-80gb" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "c").exists()


def test_sweep_report_calibrates_from_its_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    entries = []
    for name, i in CASES.items():
        step, total = measured_on(TRUTH, i)
        run = fake_run(tmp_path, name, i, step, total)
        lay = i.layout
        entries.append({"run_dir": str(run), "name": name, "nodes": 1, "procs_per_node": i.hw.gpus_per_node,
                        "gpus": i.hw.gpus_per_node, "rank": 1,
                        "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "cp": lay.cp, "dp": lay.dp,
                                   "mbs": i.train.micro_batch_size, "recompute": "none",
                                   "distributed_optimizer": True}})
    (tmp_path / sweep.SWEEP_FILE).write_text(json.dumps({"runs": entries, "emulated": True, "gpu_type": "cpu"}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert sweep._report_cmd(tmp_path, 2, wait=False, timeout=1, calibrate="") == 0
    out = capsys.readouterr().out
    cal = read_calibration(str(tmp_path / sweep.CALIBRATION_FILE))
    assert cal.compute == pytest.approx(TRUTH.compute, rel=0.05) and "cluster.calibration=" in out
    assert sweep._report_cmd(tmp_path, 2, wait=False, timeout=1) == 0  # without --calibrate: a hint
    assert "--calibrate" in capsys.readouterr().out


# --------------------------------------------------------------------------- real runs


#: (name, processes, overrides): different layouts and batch sizes of the tiny model on CPU.
REAL_RUNS = [
    ("fit-1p-mbs1", 1, ["training.micro_batch_size=1", "training.global_batch_size=8"]),
    ("fit-1p-mbs4", 1, ["training.micro_batch_size=4", "training.global_batch_size=8"]),
    ("fit-tp2-mbs2", 2, ["parallelism.tp=2", "parallelism.sequence_parallel=true", "training.micro_batch_size=2",
                         "training.global_batch_size=8"]),
    ("fit-tp2-mbs4", 2, ["parallelism.tp=2", "parallelism.sequence_parallel=true", "training.micro_batch_size=4",
                         "training.global_batch_size=8"]),
    ("held-1p-mbs2-gbs16", 1, ["training.micro_batch_size=2", "training.global_batch_size=16"]),
    ("held-tp2-mbs1", 2, ["parallelism.tp=2", "parallelism.sequence_parallel=true", "training.micro_batch_size=1",
                          "training.global_batch_size=8"]),
]


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_calibration_from_real_cpu_runs_predicts_held_back_runs_better(tmp_path: Path, capsys) -> None:
    """Six short real runs through the launcher; calibrate on four, compare on the two held back.

    One thread per process (OMP_NUM_THREADS=1, as torchrun sets for several processes), so that a
    CPU "GPU" is one core in every run. The machine is shared, so the numbers are noisy: the
    assertion is the held-back error before vs after, not a tight bound."""
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, procs, overrides in REAL_RUNS:
        proc = launcher("config=tiny_local", f"runs_root={runs}", f"run_name={name}", f"cluster.gpus_per_node={procs}",
                        "training.train_steps=16", *overrides, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "cluster_calibration.yaml"
    assert main(["calibrate", "--runs", str(runs), "--out", str(out), "--hold-out", "held-", "--skip", "3",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    with capsys.disabled():
        print("\ncalibration from real CPU runs (step time, s; error = predicted / measured - 1):")
        for r in d["runs"]:
            print(f"  {r['name'][:34]:34s} {'held back' if r['held_out'] else 'fitted':9s} measured "
                  f"{r['measured_step_s']:.4f}  shipped {r['before_step_s']:.4f} ({100 * r['before_error']:+.0f}%)  "
                  f"calibrated {r['after_step_s']:.4f} ({100 * r['after_error']:+.0f}%)")
        err = d["calibration"]["step_time_error"]
        print(f"  held-back mean |error|: shipped {100 * err['held_out_before']:.0f}% -> calibrated "
              f"{100 * err['held_out_after']:.0f}%; fitted runs {100 * err['fitted_before']:.0f}% -> "
              f"{100 * err['fitted_after']:.0f}%")
    err = d["calibration"]["step_time_error"]
    assert err["held_out_after"] < err["held_out_before"]
    assert err["fitted_after"] < err["fitted_before"]
    tp2 = next(r for r in d["runs"] if r["name"].startswith("held-tp2"))
    assert abs(tp2["after_error"]) < abs(tp2["before_error"])  # the shipped CPU profile has no gloo latency
    # the next plan uses it: parallelism=auto with cluster.calibration, and its page
    proc = launcher("config=tiny_local", "dry_run=true", "parallelism=auto", "cluster.gpus_per_node=2",
                    f"cluster.calibration={out}", f"runs_root={tmp_path / 'next'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((only_run(tmp_path / "next") / "prediction.json").read_text())["calibration"]["source"] == str(out)
