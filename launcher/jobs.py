"""Job management: ``list``, ``status``, ``logs``, ``cancel``, ``wait`` (dispatched by launcher.cli).

A run is named by its directory, by its run-dir name (or a prefix of it) under the runs
root, or by its Slurm job id; with no name, the newest run. State comes from the backend
that ran it (Slurm, batched over all runs in one call) and is cached in ``job.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher import console
from launcher.rundir import list_run_dirs, read_job_record, write_job_record

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "NOT_SUBMITTED", "LOST"}
DEFAULT_ROOT = os.environ.get("HYPERLAUNCH_RUNS_ROOT", "runs")


class UsageError(Exception):
    pass


def resolve_run(name: str | None, runs_root: str) -> Path:
    runs = list_run_dirs(runs_root)
    if name is None:
        if not runs:
            raise UsageError(f"no runs under {runs_root!r}; start one with `python -m launcher config=tiny_local` "
                             "or pass --runs-root")
        return runs[-1]
    path = Path(name).expanduser()
    if (path / "config.yaml").exists():
        return path
    matches = [r for r in runs if r.name.startswith(name) or str(read_job_record(r).get("job_id")) == name]
    if not matches:
        raise UsageError(f"no run named {name!r} under {runs_root!r} (a run directory, its name, or a Slurm job id); "
                         "see `python -m launcher list`")
    return matches[-1]


def _backend(record: dict[str, Any]):
    from cluster.pyslurm_backend import select_backend

    return select_backend(record.get("slurm_backend", "auto"))


def refresh(run_dirs: list[Path]) -> dict[Path, dict[str, Any]]:
    """Current records; Slurm states fetched in ONE batched call for all live jobs."""
    from cluster.local import process_alive

    records = {r: read_job_record(r) for r in run_dirs}
    live = {str(rec["job_id"]): r for r, rec in records.items()
            if rec.get("backend") == "slurm" and rec.get("state") not in TERMINAL and rec.get("job_id")}
    if live:
        any_record = records[next(iter(live.values()))]
        statuses = _backend(any_record).status(list(live))
        for job_id, st in statuses.items():
            run = live.get(job_id)
            if run is None:
                continue
            rec = records[run]
            rec.update(state=st.state, exit_code=st.exit_code, reason=st.reason, nodes=st.nodes, elapsed=st.elapsed)
            write_job_record(run, rec)
    for run, rec in records.items():
        if rec.get("backend") == "local" and rec.get("state") == "RUNNING" and not process_alive(int(rec.get("pid", 0) or 0)):
            rec.update(state="LOST", reason="the launcher process ended without recording an exit status")
            write_job_record(run, rec)
    return records


def log_files(run_dir: Path, record: dict[str, Any], stderr: bool = False) -> list[Path]:
    logs = run_dir / "logs"
    if record.get("backend") == "local":
        return [logs / "local.out"]
    job_id = record.get("job_id")
    pattern = f"*_{job_id}.{'err' if stderr else 'out'}" if job_id else ("*.err" if stderr else "*.out")
    return sorted(logs.glob(pattern))


def tail_text(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _print_status(run: Path, rec: dict[str, Any], as_json: bool) -> None:
    from launcher import goodput_view

    ledger = goodput_view.summary(run)
    if as_json:
        console.info(json.dumps({"run_dir": str(run), **rec, "goodput": ledger}, sort_keys=True))
        return
    parts = [f"{run.name}: {rec.get('state', 'UNKNOWN')}"]
    for key in ("backend", "job_id", "exit_code", "reason", "nodes", "elapsed"):
        if rec.get(key) not in (None, "", "None"):
            parts.append(f"{key}={rec[key]}")
    console.info("  ".join(parts))
    if ledger is not None:
        console.info("\n".join(goodput_view.lines(ledger)))
    if rec.get("state") in TERMINAL - {"COMPLETED", "NOT_SUBMITTED"}:
        for path in log_files(run, rec) + log_files(run, rec, stderr=True):
            text = tail_text(path, 20)
            if text:
                console.info(f"--- last lines of {path} ---\n{text}")


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    runs = list_run_dirs(args.runs_root)
    if not runs:
        console.info(f"no runs under {args.runs_root}")
        return 0
    records = refresh(runs)
    table = Table(title=f"runs under {args.runs_root}")
    for col in ("run", "backend", "job id", "state", "exit"):
        table.add_column(col)
    for run in runs:
        rec = records[run]
        table.add_row(run.name, str(rec.get("backend", "?")), str(rec.get("job_id", rec.get("pid", ""))),
                      str(rec.get("state", "?")), "" if rec.get("exit_code") is None else str(rec["exit_code"]))
    Console(width=160).print(table)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, args.runs_root)
    rec = refresh([run])[run]
    _print_status(run, rec, args.json)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, args.runs_root)
    deadline = time.monotonic() + args.timeout
    delay = 1.0
    while True:
        rec = refresh([run])[run]
        if rec.get("state") in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, args.max_interval)
    _print_status(run, rec, args.json)
    if rec.get("state") not in TERMINAL:
        console.error(f"timed out after {args.timeout:.0f} s waiting for {run.name}")
        return 124
    return 0 if rec.get("state") == "COMPLETED" else 1


def cmd_logs(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, args.runs_root)
    rec = read_job_record(run)
    files = log_files(run, rec, stderr=args.err)
    if not args.follow:
        if not files:
            console.info(f"no log yet for {run.name} (state {rec.get('state', 'UNKNOWN')})")
            return 0
        for path in files:
            console.info(tail_text(path, args.lines))
        return 0
    return _follow(run, args)


def _follow(run: Path, args: argparse.Namespace) -> int:
    offset = 0
    last_check, state = 0.0, None
    while True:
        rec = read_job_record(run)
        files = log_files(run, rec, stderr=args.err)
        if files:
            with open(files[-1], "rb") as fh:
                if offset == 0:
                    fh.seek(0, os.SEEK_END)
                    offset = max(0, fh.tell() - 64 * 1024)
                fh.seek(offset)
                chunk = fh.read()
                offset += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if time.monotonic() - last_check > 5:
            state = refresh([run])[run].get("state")
            last_check = time.monotonic()
            if state in TERMINAL:
                return 0
        time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    from cluster.local import stop_process_group

    run = resolve_run(args.run, args.runs_root)
    rec = refresh([run])[run]  # the scheduler's state now: a pending job is cancelled, a running one stopped
    if rec.get("state") in TERMINAL:
        console.info(f"{run.name} already ended ({rec.get('state')}); nothing to cancel")
        return 0
    if rec.get("backend") == "slurm" and (args.now or rec.get("state") != "RUNNING"):
        _backend(rec).cancel(str(rec["job_id"]))
        console.info(f"cancel requested for Slurm job {rec['job_id']} ({run.name})")
    elif rec.get("backend") == "slurm":
        _backend(rec).stop(str(rec["job_id"]))
        console.info(f"asked Slurm job {rec['job_id']} ({run.name}) to stop: every rank stops after the same step, "
                     f"saves a checkpoint and exits, then the job ends as cancelled (`launcher cancel --now "
                     f"{run.name}` ends it at once, without saving)")
    elif rec.get("backend") == "local" and rec.get("pid"):
        stopped = stop_process_group(int(rec["pid"]))
        rec.update(state="CANCELLED", ended=time.time())
        write_job_record(run, rec)
        console.info(f"{'stopped' if stopped else 'already gone:'} local run {run.name} (pid {rec['pid']})")
    else:
        console.info(f"{run.name} has no running job")
    return 0
