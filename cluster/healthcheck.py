"""Preflight health checks of a set of nodes: GPUs, EFA, all-reduce bandwidth; a verdict per node.

Operators, on an allocation (``salloc -N 4``, then)::

    python -m cluster.healthcheck --nodes "$SLURM_JOB_NODELIST" [--config RUN_DIR | --gpu-type h100-80gb
        --gpus-per-node 8 --instance-type p5.48xlarge --efa-devices 32] [--time-budget 180] [--out DIR]

runs the checks through ``srun`` on the nodes (one rank per GPU, one per CPU node), prints a table of
results per node and exits 0 when every node is healthy, 1 when some node failed, 2 on a usage error.
``--out`` (default ``./healthcheck-<time>``) must be visible from every node (a shared filesystem).

The job's preflight step (rendered by cluster.sbatch) runs the same ranks with::

    python -m cluster.healthcheck worker --run-dir <run dir>

reading ``cluster.preflight`` from the run's config and writing into ``<run dir>/preflight/``
(cluster.health_report). See docs/preflight.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cluster.health_records import HealthSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFLIGHT_DIR = "preflight"
USAGE, FAILED, HEALTHY = 2, 1, 0


class UsageError(Exception):
    pass


def settings_from_config(root: Any, run_dir: Optional[str] = None) -> HealthSettings:
    """HealthSettings from a RootConfig (``cluster`` and ``monitoring.pushgateway_url``)."""
    c, p = root.cluster, root.cluster.preflight
    return HealthSettings(
        time_budget_s=float(p.time_budget_s), gpu_diag_level=p.gpu_diag_level, bandwidth_check=p.bandwidth_check,
        min_bandwidth_fraction=p.min_bandwidth_fraction, quarantine=p.quarantine,
        max_quarantine_fraction=p.max_quarantine_fraction, max_requeues=p.max_requeues, gpu_type=c.gpu_type,
        gpus_per_node=c.gpus_per_node, efa_devices=c.efa_devices, instance_type=c.instance_type,
        expected_gbps=p.expected_gbps, port=c.rdzv_port + 1, pushgateway_url=root.monitoring.pushgateway_url,
        run_name=Path(run_dir).name if run_dir else root.run_name,
        quarantine_action="replace" if c.kind == "hyperpod" and p.hyperpod_replace else "drain")


def attempt_id(env: Optional[dict[str, str]] = None) -> str:
    env = dict(os.environ) if env is None else env
    return f"{env.get('SLURM_JOB_ID', 'nojob')}.{env.get('SLURM_RESTART_COUNT', '0')}"


# ---- worker (one per rank, started by srun) ------------------------------------------------------

def worker(argv: list[str]) -> int:
    from cluster.health_worker import Outputs, run_rank

    parser = argparse.ArgumentParser(prog="python -m cluster.healthcheck worker")
    parser.add_argument("--run-dir", help="a run directory: settings from its config.yaml, results in preflight/")
    parser.add_argument("--settings", help="a HealthSettings JSON file (the operator command writes it)")
    parser.add_argument("--out", help="with --settings: the results directory")
    args = parser.parse_args(argv)
    if args.run_dir:
        from configs.loading import load_run_config

        run = Path(args.run_dir)
        settings = settings_from_config(load_run_config(run / "config.yaml"), str(run))
        attempt = attempt_id()
        control = Path(os.environ.get("HYPERLAUNCH_CONTROL_DIR") or run / "control")
        outputs = Outputs(results_dir=run / PREFLIGHT_DIR / attempt, report=run / PREFLIGHT_DIR / f"{attempt}.json",
                          attempt=attempt, events=run / PREFLIGHT_DIR / "events.jsonl",
                          quarantine=control / "preflight_quarantine")
    elif args.settings and args.out:
        settings = HealthSettings.from_json(Path(args.settings).read_text())
        out = Path(args.out)
        outputs = Outputs(results_dir=out, report=out / "report.json", attempt=attempt_id())
    else:
        parser.error("give --run-dir, or --settings and --out")
    return run_rank(settings, outputs)


# ---- operator command ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.healthcheck", description=__doc__.splitlines()[0],
                                epilog="exit status: 0 every node healthy, 1 some node failed, 2 usage error")
    p.add_argument("--nodes", required=True, help="Slurm hostlist, e.g. \"$SLURM_JOB_NODELIST\" or ip-10-1-[2-5]")
    p.add_argument("--config", help="a run directory (or its config.yaml): cluster and preflight settings from it")
    p.add_argument("--gpu-type", help="cpu, h100-80gb, ... (configs/hardware.py)")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--instance-type", help="e.g. p5.48xlarge: expected EFA bandwidth from cluster/bandwidth.py")
    p.add_argument("--efa-devices", type=int, help="EFA devices a node must have (0: no EFA check)")
    p.add_argument("--time-budget", type=float, help="seconds for everything (default 180)")
    p.add_argument("--gpu-diag-level", type=int, choices=(0, 1, 2), help="dcgmi diag -r LEVEL; 0: NVML only")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth tests")
    p.add_argument("--min-fraction", type=float, help="a link below this share of the expected bandwidth fails")
    p.add_argument("--expected-gbps", type=float, help="line rate per node (Gbit/s) when the catalogue lacks it")
    p.add_argument("--port", type=int, help="rendezvous port on the first node (default 29501)")
    p.add_argument("--out", help="results directory visible from every node (default ./healthcheck-<time>)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument("--container-image", help="run the checks in this pyxis/enroot image")
    p.add_argument("--container-mounts", help="pyxis --container-mounts (src:dst,...)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--srun", default="srun", help=argparse.SUPPRESS)
    return p


def operator_settings(args: argparse.Namespace) -> HealthSettings:
    from configs.hardware import GPU_TYPES

    base = HealthSettings()
    if args.config:
        from configs.errors import ConfigError
        from configs.loading import load_run_config

        path = Path(args.config)
        path = path / "config.yaml" if path.is_dir() else path
        try:
            base = settings_from_config(load_run_config(path), str(path.parent))
        except (OSError, ConfigError) as exc:
            raise UsageError(f"--config {args.config}: {exc}") from None
    overrides = {"gpu_type": args.gpu_type, "gpus_per_node": args.gpus_per_node, "instance_type": args.instance_type,
                 "efa_devices": args.efa_devices, "time_budget_s": args.time_budget,
                 "gpu_diag_level": args.gpu_diag_level, "min_bandwidth_fraction": args.min_fraction,
                 "expected_gbps": args.expected_gbps, "port": args.port}
    values = {**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    if args.no_bandwidth:
        values["bandwidth_check"] = False
    problems = []
    if values["gpu_type"] not in GPU_TYPES:
        problems.append(f"--gpu-type {values['gpu_type']!r}: one of {', '.join(GPU_TYPES)}")
    if values["gpus_per_node"] < 1:
        problems.append(f"--gpus-per-node {values['gpus_per_node']}: at least 1")
    if values["time_budget_s"] < 10:
        problems.append(f"--time-budget {values['time_budget_s']:g}: at least 10 s (180 is the default)")
    if not 0 < values["min_bandwidth_fraction"] <= 1:
        problems.append(f"--min-fraction {values['min_bandwidth_fraction']:g}: in (0, 1]")
    if problems:
        raise UsageError("; ".join(problems))
    return HealthSettings(**values)


def srun_command(args: argparse.Namespace, settings: HealthSettings, nodes: list[str], settings_file: Path,
                 out: Path) -> list[str]:
    cmd = [args.srun, f"--nodes={len(nodes)}", f"--nodelist={args.nodes}",
           f"--ntasks-per-node={settings.ranks_per_node}", "--kill-on-bad-exit=0", "--export=ALL"]
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.account:
        cmd.append(f"--account={args.account}")
    if args.container_image:
        cmd += [f"--container-image={args.container_image}", f"--container-workdir={REPO_ROOT}"]
        if args.container_mounts:
            cmd.append(f"--container-mounts={args.container_mounts}")
    return cmd + [args.python, "-m", "cluster.healthcheck", "worker", "--settings", str(settings_file),
                  "--out", str(out)]


def operator(argv: list[str]) -> int:
    import json

    from cluster.health_report import render_table
    from cluster.hostlist import expand_hostlist

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return USAGE if exc.code else HEALTHY
    try:
        nodes = expand_hostlist(args.nodes)
        if not nodes:
            raise ValueError("no nodes")
        settings = operator_settings(args)
    except (ValueError, UsageError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return USAGE
    out = Path(args.out or f"healthcheck-{time.strftime('%Y%m%dT%H%M%S')}").resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        settings_file = out / "settings.json"
        settings_file.write_text(settings.to_json())
    except OSError as exc:
        print(f"healthcheck: cannot write --out {out}: {exc}", file=sys.stderr)
        return USAGE
    cmd = srun_command(args, settings, nodes, settings_file, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=settings.time_budget_s + 120)
        if proc.returncode not in (0, 1):
            print(proc.stderr[-3000:], file=sys.stderr)
    except FileNotFoundError:
        print(f"healthcheck: {args.srun} not found: run this on a Slurm login or compute node", file=sys.stderr)
        return USAGE
    except subprocess.TimeoutExpired:
        print(f"healthcheck: srun did not end within {settings.time_budget_s + 120:.0f} s", file=sys.stderr)
    report_path = out / "report.json"
    if not report_path.exists():
        print(f"healthcheck: no report in {out} (the first node's rank did not finish; see its files there)",
              file=sys.stderr)
        return FAILED
    report = json.loads(report_path.read_text())
    print(render_table(report, color=sys.stdout.isatty()), end="")
    for node, reason in report["quarantine"]:
        print(f"to drain: scontrol update nodename={shlex.quote(node)} state=drain reason={shlex.quote(reason)}")
    print(f"results: {out}")
    return FAILED if report["status"] in ("quarantine", "fail") else HEALTHY


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["worker"]:
        code = worker(args[1:])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no process-group teardown: a peer may be gone
    return operator(args)


if __name__ == "__main__":
    sys.exit(main())
