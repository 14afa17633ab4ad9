"""Benchmark sweep: short runs of the predictor's top-k layouts at several scales, measured vs predicted.

    python -m launcher sweep --nodes 1,2,4 --top-k 3 --steps 20 -- config=llama3_70b_p5
    python -m launcher sweep --points 1x1,1x2 --top-k 2 --steps 6 -- config=tiny_local cluster=slurm ...
    python -m launcher sweep --report <sweep dir>        # (re)build the report of a finished sweep
    python -m launcher sweep ... --calibrate [FILE]      # and fit this cluster's calibration from the runs

For every scale point (``--nodes`` N, or ``--points`` NODESxPROCS to emulate several node
counts with processes per node on one machine) the predictor ranks every layout that fits;
the best of each of the top-k distinct 4D splits is launched as its own short run (the
normal launch path: one run directory and one Slurm job each, under ``<runs_root>/sweeps/``).
With ``--wait`` (the default) the sweep waits for them, then reads each run's log -- the
per-step ``step_time_s`` / ``tokens_per_s`` lines (median after ``--skip`` warm-up steps)
and the final ``memory:`` line -- and writes ``report.json``, ``report.md`` and
``scaling.png`` (throughput and scaling efficiency vs GPUs, predicted and measured; needs
matplotlib) into the sweep directory. With ``--calibrate`` it then refits the predictor's
efficiencies and memory overheads to the sweep's runs (``python -m memory_predictor calibrate``)
and writes ``cluster_calibration.yaml`` (or FILE): the plan for the long run then uses what this
cluster measured (``cluster.calibration=FILE``, ``plan --calibration FILE``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from launcher import console
from launcher.rundir import read_job_record

SWEEP_FILE = "sweep.json"
REPORT_JSON, REPORT_MD, SCALING_PNG = "report.json", "report.md", "scaling.png"
CALIBRATION_FILE = "cluster_calibration.yaml"
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `python -m launcher` (after --)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--nodes", help="node counts, e.g. 1,2,4 (GPUs per node from the config)")
    scale.add_argument("--points", help="NODESxPROCS_PER_NODE points, e.g. 1x1,1x2 (emulate scales on one machine)")
    parser.add_argument("--top-k", type=int, default=3, help="distinct layouts per point")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    parser.add_argument("--name", default=None, help="sweep name (default: the config's run_name)")
    parser.add_argument("--no-wait", action="store_true", help="submit and return; build the report later with --report")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the runs")
    parser.add_argument("--report", metavar="SWEEP_DIR", help="only (re)build the report of this sweep")
    parser.add_argument("--calibrate", nargs="?", const="", default=None, metavar="FILE",
                        help=f"after the report, fit this cluster's calibration to the sweep's runs and write it "
                             f"(default: <sweep dir>/{CALIBRATION_FILE})")


def run(args: argparse.Namespace) -> int:
    if args.report:
        return _report_cmd(Path(args.report), args.skip, wait=not args.no_wait, timeout=args.timeout,
                           calibrate=args.calibrate)
    from configs.errors import ConfigError

    try:
        sweep_dir = submit(args)
    except ConfigError as exc:
        console.error(str(exc))
        return 2
    if args.no_wait:
        console.info(f"sweep submitted: {sweep_dir}\n  report: python -m launcher sweep --report {sweep_dir}")
        return 0
    return _report_cmd(sweep_dir, args.skip, wait=True, timeout=args.timeout, calibrate=args.calibrate)


def parse_points(args: argparse.Namespace, gpus_per_node: int) -> list[tuple[int, int]]:
    from configs.errors import ConfigError, Problem

    try:
        if args.points:
            pts = [tuple(int(x) for x in item.lower().split("x")) for item in args.points.split(",") if item]
            if not pts or any(len(p) != 2 for p in pts):
                raise ValueError
            points = [(p[0], p[1]) for p in pts]
        else:
            points = [(int(n), gpus_per_node) for n in (args.nodes or "1").split(",") if n]
    except ValueError:
        raise ConfigError([Problem("--points" if args.points else "--nodes", args.points or args.nodes,
                                   "use comma-separated node counts (1,2,4) or NODESxPROCS points (1x1,1x2)")]) from None
    bad = [p for p in points if p[0] <= 0 or p[1] <= 0]
    if bad or args.top_k <= 0 or args.steps <= args.skip:
        raise ConfigError([Problem("sweep", f"points={points} top_k={args.top_k} steps={args.steps} skip={args.skip}",
                                   "points and --top-k must be positive, and --steps larger than --skip")])
    return points


def compose(overrides: list[str], args: argparse.Namespace):
    """(typed config, scale points) for these overrides, composed as `python -m launcher` does.

    The base config is validated as ``parallelism=auto`` at the first point: its own layout
    does not matter, the sweep writes the predictor's layouts in.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from configs.loading import explicit_model_fields, to_root
    from launcher.manifest import PROJECT_ROOT
    from configs.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "configs"), version_base=None):
        raw = hydra_compose("launcher", overrides=list(overrides))
    points = parse_points(args, int(raw.cluster.gpus_per_node))
    for key, value in (("parallelism.mode", "auto"), ("parallelism.dp", None), ("cluster.nodes", points[0][0]),
                       ("cluster.gpus_per_node", points[0][1]), ("training.train_steps", args.steps),
                       ("training.train_tokens", None)):
        OmegaConf.update(raw, key, value, force_add=True)
    return to_root(raw, explicit=explicit_model_fields(list(overrides))), points


def submit(args: argparse.Namespace) -> Path:
    """Launch every (point, layout) run; returns the sweep directory (holding sweep.json)."""
    from launcher import app
    from launcher.jobs import resolve_run
    from launcher.rundir import new_run_dir_path
    from configs.errors import ConfigError, Problem
    from configs.validate import validate
    from launcher.sizing import search_layouts, with_layout

    base, points = compose(args.overrides, args)
    sweep_dir = new_run_dir_path(str(Path(base.runs_root) / "sweeps"), args.name or base.run_name)
    sweep_dir.mkdir(parents=True)
    runs: list[dict[str, Any]] = []
    for nodes, procs in points:
        point = replace(base, runs_root=str(sweep_dir), cluster=replace(base.cluster, nodes=nodes, gpus_per_node=procs))
        result = search_layouts(point)
        chosen = result.distinct(args.top_k)
        if not chosen:
            raise ConfigError([Problem("cluster.nodes", nodes, f"no layout fits {nodes} x {procs}; drop this point")])
        for k, cand in enumerate(chosen, start=1):
            name = f"{point.run_name}-n{nodes}x{procs}-k{k}"
            root = replace(with_layout(point, cand.layout, cand.train), run_name=name)
            validate(root)
            console.info(f"sweep: {name}: {cand.layout.short()} mbs={cand.micro_batch_size}")
            rc = app.launch(root, ["sweep", *args.overrides])
            run_dir = resolve_run(name, str(sweep_dir))
            runs.append({"run_dir": str(run_dir), "name": name, "nodes": nodes, "procs_per_node": procs,
                         "gpus": nodes * procs, "rank": k, "launch_exit": rc,
                         "layout": {"tp": cand.layout.tp, "pp": cand.layout.pp, "vpp": cand.layout.vpp,
                                    "cp": cand.layout.cp, "dp": cand.layout.dp, "mbs": cand.micro_batch_size,
                                    "recompute": cand.layout.recompute,
                                    "distributed_optimizer": cand.layout.distributed_optimizer}})
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "overrides": list(args.overrides),
              "points": [list(p) for p in points], "top_k": args.top_k, "steps": args.steps,
              "gpu_type": base.cluster.gpu_type, "kind": base.cluster.kind,
              "emulated": bool(args.points), "runs": runs}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return sweep_dir


def wait_for(run_dirs: list[Path], timeout: float) -> dict[Path, dict[str, Any]]:
    from launcher.jobs import TERMINAL, refresh

    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        records = refresh(run_dirs)
        if all(rec.get("state") in TERMINAL for rec in records.values()) or time.monotonic() > deadline:
            return records
        time.sleep(delay)
        delay = min(delay * 1.5, 15.0)


def measure(run_dir: Path, skip: int) -> dict[str, Any]:
    """Median step time / tokens/s / TFLOP/s after ``skip`` steps, and the peak-memory line."""
    from memory_predictor.runs import measure_run

    m = measure_run(run_dir, skip)
    out: dict[str, Any] = {"state": read_job_record(run_dir).get("state"), "steps_logged": m.steps_logged}
    if m.step_time_s is not None:
        out.update(step_time_s=m.step_time_s, tokens_per_s=m.tokens_per_s, tflops_per_gpu=m.tflops_per_gpu)
    if m.memory_kind is not None:
        out.update(memory_kind=m.memory_kind, peak_allocated_bytes=m.peak_allocated_bytes,
                   peak_reserved_bytes=m.peak_reserved_bytes)
    return out


def build_report(sweep_dir: Path, skip: int) -> dict[str, Any]:
    sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    rows = []
    for entry in sweep["runs"]:
        run_dir = Path(entry["run_dir"])
        predicted = json.loads((run_dir / "prediction.json").read_text()) if (run_dir / "prediction.json").exists() else {}
        measured = measure(run_dir, skip)
        peak = (predicted.get("breakdown") or {}).get("peak") or {}
        cpu = measured.get("memory_kind") == "cpu_max_rss"
        # like for like: CUDA allocator peaks vs our allocated/reserved; CPU max RSS vs our total
        pred_mem = peak.get("total") if cpu else peak.get("allocated")
        meas_mem = measured.get("peak_allocated_bytes")
        row = {**entry, "measured": measured,
               "predicted": {k: predicted.get(k) for k in ("tokens_per_s", "tflops_per_gpu", "step_time_s", "peak_bytes",
                                                            "fits")} | {"peak_allocated_bytes": peak.get("allocated"),
                                                                         "peak_reserved_bytes": peak.get("reserved")},
               "memory_compared": "predicted total vs max RSS (CPU)" if cpu else "predicted allocated vs max_memory_allocated",
               "ratio_tokens_per_s": _ratio(predicted.get("tokens_per_s"), measured.get("tokens_per_s")),
               "ratio_memory": _ratio(pred_mem, meas_mem)}
        rows.append(row)
    scaling = _scaling(rows)
    report = {"sweep_dir": str(sweep_dir), "emulated_scales": sweep.get("emulated"), "gpu_type": sweep.get("gpu_type"),
              "skip_steps": skip, "runs": rows, "scaling": scaling}
    (sweep_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (sweep_dir / REPORT_MD).write_text(render_markdown(report))
    report["plot"] = write_scaling_plot(sweep_dir / SCALING_PNG, scaling)
    return report


def _ratio(predicted: float | None, measured: float | None) -> float | None:
    return predicted / measured if predicted and measured else None


def _scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scale point: the best measured (and best predicted) throughput, and efficiency vs the smallest."""
    points: dict[int, dict[str, Any]] = {}
    for row in rows:
        gpus = row["gpus"]
        p = points.setdefault(gpus, {"gpus": gpus, "nodes": row["nodes"], "measured_tokens_per_s": None,
                                     "predicted_tokens_per_s": None})
        for key, value in (("measured_tokens_per_s", row["measured"].get("tokens_per_s")),
                           ("predicted_tokens_per_s", row["predicted"].get("tokens_per_s"))):
            if value and (p[key] is None or value > p[key]):
                p[key] = value
    ordered = [points[g] for g in sorted(points)]
    for key in ("measured", "predicted"):
        base = next((p for p in ordered if p[f"{key}_tokens_per_s"]), None)
        for p in ordered:
            value = p[f"{key}_tokens_per_s"]
            p[f"{key}_efficiency"] = (value / p["gpus"]) / (base[f"{key}_tokens_per_s"] / base["gpus"]) \
                if base and value else None
    return ordered


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Benchmark sweep: predicted vs measured ({report['gpu_type']})", ""]
    if report.get("emulated_scales"):
        lines += ["Scale points are emulated with processes per node on one machine (NODESxPROCS).", ""]
    lines += ["| run | scale | layout | state | tokens/s pred | tokens/s meas | ratio | memory GiB pred | "
              "memory GiB meas | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lay, m, p = r["layout"], r["measured"], r["predicted"]
        cpu = m.get("memory_kind") == "cpu_max_rss"
        pred_mem = p.get("peak_bytes") if cpu else p.get("peak_allocated_bytes")
        lines.append(f"| {r['name']} | {r['nodes']}x{r['procs_per_node']} | tp{lay['tp']} pp{lay['pp']} vpp{lay['vpp']} "
                     f"cp{lay['cp']} dp{lay['dp']} mbs{lay['mbs']} {lay['recompute']} | {m.get('state')} | "
                     f"{_fmt(p.get('tokens_per_s'))} | {_fmt(m.get('tokens_per_s'))} | {_fmt(r['ratio_tokens_per_s'], '.2f')} | "
                     f"{_fmt(pred_mem and pred_mem / GIB)} | {_fmt(m.get('peak_allocated_bytes') and m['peak_allocated_bytes'] / GIB)} | "
                     f"{_fmt(r['ratio_memory'], '.2f')} |")
    lines += ["", "Memory: on GPUs predicted allocated vs `max_memory_allocated`; on CPU predicted total (runtime "
              "base + model) vs max RSS.", "", "| GPUs | nodes | tokens/s meas | efficiency meas | tokens/s pred | "
              "efficiency pred |", "|---|---|---|---|---|---|"]
    for s in report["scaling"]:
        lines.append(f"| {s['gpus']} | {s['nodes']} | {_fmt(s['measured_tokens_per_s'])} | "
                     f"{_fmt(s['measured_efficiency'], '.2f')} | {_fmt(s['predicted_tokens_per_s'])} | "
                     f"{_fmt(s['predicted_efficiency'], '.2f')} |")
    return "\n".join(lines) + "\n"


def write_scaling_plot(path: Path, scaling: list[dict[str, Any]]) -> str | None:
    """Throughput and efficiency vs GPUs; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    gpus = [s["gpus"] for s in scaling]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("measured", "o-"), ("predicted", "s--")):
        values = [s[f"{key}_tokens_per_s"] for s in scaling]
        if any(values):
            left.plot(gpus, [v or float("nan") for v in values], style, label=key)
            right.plot(gpus, [s[f"{key}_efficiency"] or float("nan") for s in scaling], style, label=key)
    left.set_xlabel("GPUs (processes)")
    left.set_ylabel("tokens/s (best layout per point)")
    right.set_xlabel("GPUs (processes)")
    right.set_ylabel("scaling efficiency vs the smallest point")
    right.axhline(1.0, color="grey", linewidth=0.5)
    for ax in (left, right):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _report_cmd(sweep_dir: Path, skip: int, *, wait: bool, timeout: float, calibrate: str | None = None) -> int:
    if not (sweep_dir / SWEEP_FILE).exists():
        console.error(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE}); start one with `python -m launcher sweep`")
        return 2
    sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    run_dirs = [Path(r["run_dir"]) for r in sweep["runs"]]
    if wait:
        records = wait_for(run_dirs, timeout)
        unfinished = [r.name for r, rec in records.items() if rec.get("state") != "COMPLETED"]
        if unfinished:
            console.error(f"not COMPLETED: {', '.join(unfinished)} (their rows have no measurements)")
    report = build_report(sweep_dir, skip)
    console.info((sweep_dir / REPORT_MD).read_text())
    console.info(f"report: {sweep_dir / REPORT_MD}, {sweep_dir / REPORT_JSON}"
                 + (f", {report['plot']}" if report.get("plot") else " (no scaling plot: matplotlib missing)"))
    done = all(r["measured"].get("state") == "COMPLETED" for r in report["runs"])
    if calibrate is None:
        console.info(f"calibrate the predictor to these runs: python -m launcher sweep --report {sweep_dir} --calibrate"
                     f" (or python -m memory_predictor calibrate --runs {sweep_dir})")
        return 0 if done else 1
    calibrated = write_calibration(sweep_dir, skip, Path(calibrate) if calibrate else sweep_dir / CALIBRATION_FILE)
    return 0 if done and calibrated else 1


def write_calibration(sweep_dir: Path, skip: int, out: Path) -> bool:
    """Fit the cluster calibration to the sweep's runs (memory_predictor.calibrate) and write it."""
    from memory_predictor.calibration import calibration_yaml
    from memory_predictor.cli_runs import calibrate_runs, result_table
    from memory_predictor.errors import PredictorError

    try:
        result, skipped = calibrate_runs([str(sweep_dir)], skip=skip)
        out.write_text(calibration_yaml(result.calibration, f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                                        f" by python -m launcher sweep from {sweep_dir} (skip {skip} warm-up steps)"))
    except PredictorError as exc:
        console.error(f"calibration failed: {exc}")
        return False
    except OSError as exc:
        console.error(f"calibration: cannot write {out}: {exc.strerror or exc}")
        return False
    console.info(result_table(result))
    for line in skipped:
        console.error(f"left out of the calibration: {line}")
    gpu = result.calibration.gpu_type
    console.info(f"calibration: {out} (gpu_type {gpu}). The plan for the long run, with what this cluster measured:\n"
                 f"  python -m memory_predictor plan ... --gpu {gpu} --calibration {out}\n"
                 f"  python -m launcher ... cluster.calibration={out}")
    return True
