"""The launcher's subcommands, dispatched from one place: ``list status wait logs cancel`` and ``sweep``.

    python -m launcher list | status [RUN] | wait [RUN] | logs [RUN] | cancel [RUN]
    python -m launcher sweep --nodes 1,2,4 --top-k 3 -- config=llama3_70b_p5

Run management lives in launcher.jobs, the benchmark sweep in launcher.sweep; neither imports
this module or the other's entry, so the commands never import each other in a circle.
"""

from __future__ import annotations

import argparse

from cluster.backend import BackendError
from launcher import console, jobs, sweep

SUBCOMMANDS = ("list", "status", "logs", "cancel", "wait", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", description="Manage runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runs-root", default=jobs.DEFAULT_ROOT, help="where runs live (env HYPERLAUNCH_RUNS_ROOT)")
    sub.add_parser("list", parents=[common], help="list runs with their state").set_defaults(func=jobs.cmd_list)
    for name, func, helptext in (("status", jobs.cmd_status, "show a run's state"),
                                 ("wait", jobs.cmd_wait, "wait until a run ends; exit 0 if it COMPLETED"),
                                 ("cancel", jobs.cmd_cancel, "cancel a run"),
                                 ("logs", jobs.cmd_logs, "print or follow a run's log")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("run", nargs="?", help="run directory, run name (prefix) or Slurm job id; default: newest")
        p.set_defaults(func=func)
        if name in ("status", "wait"):
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "wait":
            p.add_argument("--timeout", type=float, default=24 * 3600.0)
            p.add_argument("--max-interval", type=float, default=60.0, help="polling back-off cap, seconds")
        if name == "cancel":
            p.add_argument("--now", action="store_true", help="Slurm: cancel at once, without the final checkpoint "
                           "(default: the ranks stop after the current step and save first)")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
            p.add_argument("-n", "--lines", type=int, default=50)
            p.add_argument("--err", action="store_true", help="the stderr file instead of stdout (Slurm)")
    p = sub.add_parser("sweep", help="benchmark the predictor's top layouts at several scales")
    sweep.add_arguments(p)
    p.set_defaults(func=sweep.run)
    return parser


def run_subcommand(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except jobs.UsageError as exc:
        console.error(str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except BackendError as exc:  # backend failures: one line, not a traceback
        console.error(f"Slurm: {exc}")
        return 4
