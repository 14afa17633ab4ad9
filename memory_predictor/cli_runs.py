"""``calibrate`` and ``report``: the two commands that read run directories (memory_predictor.runs).

    python -m memory_predictor calibrate --runs <runs root | sweep dir | run dir> [--out cluster_calibration.yaml]
        [--hold-out NAME,...] [--gpu-type T] [--skip N] [--calibration START.yaml] [--json]
    python -m memory_predictor report --run <run dir> --out <html> [--skip N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any
from memory_predictor.calibration import CalibrationResult, Sample, calibration_yaml, fit_calibration, \
    read_calibration
from memory_predictor.errors import PredictorError, Problem
from memory_predictor.runs import RunRecord, find_run_dirs, inputs_json, read_run

EXIT_OK = 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _abs(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def collect_runs(roots: list[str], skip: int) -> tuple[list[RunRecord], list[str]]:
    """(usable runs, one line per run left out and why)."""
    dirs = [d for root in roots for d in find_run_dirs(Path(root).expanduser())]
    if not dirs:
        raise PredictorError([Problem("runs", ", ".join(roots), "holds no run directories (none with prediction.json); "
                                      "give a runs root, a sweep directory or a run directory")])
    runs, skipped = [], []
    for d in dirs:
        try:
            record = read_run(d, skip)
        except PredictorError as exc:
            skipped.append(f"{d}: {exc.problems[0].fix}")
            continue
        if not record.measured.step_time_s:
            skipped.append(f"{d}: no step lines in its logs (state {record.state})")
            continue
        runs.append(record)
    return runs, skipped


def samples_from_runs(runs: list[RunRecord], hold_out: list[str]) -> list[Sample]:
    return [Sample(name=r.name, inputs=r.inputs, step_time_s=r.measured.step_time_s,
                   memory_kind=r.measured.memory_kind, peak_allocated_bytes=r.measured.peak_allocated_bytes,
                   peak_reserved_bytes=r.measured.peak_reserved_bytes,
                   held_out=any(r.name.startswith(prefix) for prefix in hold_out)) for r in runs]


def calibrate_runs(roots: list[str], *, skip: int = 2, hold_out: list[str] | None = None, gpu_type: str | None = None,
                   start_file: str | None = None) -> tuple[CalibrationResult, list[str]]:
    """The fit from these run directories (also what ``launcher sweep --calibrate`` calls)."""
    runs, skipped = collect_runs(roots, skip)
    types = sorted({r.inputs.hw.gpu for r in runs})
    if gpu_type is not None:
        runs = [r for r in runs if r.inputs.hw.gpu == gpu_type]
    elif len(types) > 1:
        raise PredictorError([Problem("gpu_type", ", ".join(types), "the runs come from several GPU types; a "
                                      "calibration is for one cluster type: pass --gpu-type")])
    chosen = gpu_type or (types[0] if types else "")
    if not runs:
        raise PredictorError([Problem("runs", ", ".join(roots), f"no finished run{' of ' + chosen if chosen else ''} "
                                      "with step times; " + ("; ".join(skipped[:3]) or "run a few short ones first"))])
    start = None
    if start_file:
        start = read_calibration(start_file)
        if start.problems_for(chosen, "gpu_type"):
            raise PredictorError(start.problems_for(chosen, "gpu_type"))
    return fit_calibration(samples_from_runs(runs, hold_out or []), chosen, start=start), skipped


def result_table(result: CalibrationResult) -> str:
    head = (f"{'run':40s} {'':4s} {'layout':34s} {'step s':>8s} {'before':>8s} {'err':>6s} {'after':>8s} {'err':>6s} "
            f"{'memory GiB':>10s} {'before':>7s} {'after':>7s}")
    lines = [head, "-" * len(head)]
    for r in result.samples:
        g = 1024**3
        mem = f"{r.measured_memory / g:10.3f}" if r.measured_memory else f"{'-':>10s}"
        lines.append(f"{r.name[:40]:40s} {'held' if r.held_out else 'fit':4s} {r.layout[:34]:34s} "
                     f"{r.measured_step_s or 0:8.4f} {r.before_step_s:8.4f} {_pct(r.before_error):>6s} "
                     f"{r.after_step_s:8.4f} {_pct(r.after_error):>6s} {mem} {r.before_memory / g:7.3f} "
                     f"{r.after_memory / g:7.3f}")
    cal, start = result.calibration, result.start
    err = cal.step_time_error or {}
    lines.append("")
    lines.append(f"step-time error (mean |predicted / measured - 1|): fitted runs {_abs(err.get('fitted_before'))} -> "
                 f"{_abs(err.get('fitted_after'))}" + (f"; held-out runs {_abs(err.get('held_out_before'))} -> "
                                                       f"{_abs(err.get('held_out_after'))}" if cal.held_out else ""))
    for name in cal.fitted:
        lines.append(f"  {name:26s} {getattr(start, name):.4g} -> {getattr(cal, name):.4g}")
    return "\n".join(lines)


def calibrate(args: argparse.Namespace) -> int:
    from memory_predictor import render

    if args.skip < 0:
        raise PredictorError([Problem("skip", args.skip, "must be >= 0")])
    render.check_output(args.out, "--out")
    hold = [x.strip() for x in (args.hold_out or "").split(",") if x.strip()]
    result, skipped = calibrate_runs(args.runs, skip=args.skip, hold_out=hold, gpu_type=args.gpu_type,
                                     start_file=args.calibration)
    cal = result.calibration
    header = (f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from {', '.join(args.runs)} "
              f"(skip {args.skip} warm-up steps)")
    render.write_text(args.out, calibration_yaml(cal, header))
    if args.json:
        print(json.dumps({"calibration": cal.as_dict(), "out": args.out, "skipped": skipped,
                          "runs": [{**{k: getattr(r, k) for k in ("name", "held_out", "layout", "measured_step_s",
                                                                  "before_step_s", "after_step_s", "measured_memory",
                                                                  "before_memory", "after_memory")},
                                    "before_error": r.before_error, "after_error": r.after_error}
                                   for r in result.samples]}, indent=2))
        return EXIT_OK
    print(result_table(result))
    for line in skipped:
        print(f"left out: {line}", file=sys.stderr)
    print(f"\nwrote {args.out} (gpu_type {cal.gpu_type}, {len(cal.runs)} runs fitted). Use it for the next plan:\n"
          f"  python -m memory_predictor plan ... --gpu {cal.gpu_type} --calibration {args.out}\n"
          f"  python -m launcher ... cluster.calibration={args.out}")
    return EXIT_OK


def run_report_html(run_dir: Path, skip: int = 2) -> tuple[str, RunRecord, dict[str, Any]]:
    """(the plan page of a run directory with what its logs measured, the run, the page's data)."""
    from memory_predictor.report import run_page_data
    from memory_predictor.report_html import render_page

    record = read_run(run_dir, skip)
    prediction = dict(record.prediction)
    if "inputs" not in prediction:  # a run launched before prediction.json recorded them
        i = record.inputs
        prediction["inputs"] = inputs_json(i.model, i.train, i.layout, i.opts, i.hw)
    data = run_page_data(prediction, measured=record.measured, run_dir=record.run_dir,
                         generated=time.strftime("re-rendered %Y-%m-%d %H:%M UTC by python -m memory_predictor report",
                                                 time.gmtime()))
    return render_page(data), record, data


def report(args: argparse.Namespace) -> int:
    from memory_predictor import render

    render.check_output(args.out, "--out")
    page, record, data = run_report_html(Path(args.run).expanduser(), args.skip)
    render.write_text(args.out, page)
    m = record.measured
    print(f"wrote {args.out}: {record.name}, {m.steps_logged} steps logged; step time predicted "
          f"{data['chosen']['step_time_s']:.4g} s, measured "
          f"{'-' if m.step_time_s is None else format(m.step_time_s, '.4g')} s")
    return EXIT_OK
