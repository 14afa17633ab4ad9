"""Benchmark: what monitoring costs the training step (target: under 1%).

Side by side in one run, interleaved: the same CPU training (``config=tiny_local``, ``--ranks``
processes, DP, gloo) with monitoring OFF and ON. ON is everything a job gets: a Prometheus exporter per rank
scraped every second by this script (15x the default rate), the node exporter, the straggler
detector (one all-gather every ``interval_steps``), W&B in offline mode and the Pushgateway-less
job metrics. Two parts are reported and added:

* interference: mean ``step_time_s`` ON / OFF - 1, per interleaved pair of runs, the median over
  the pairs (exporter threads, scrapes, the W&B process and the straggler all-gather compete with
  the step; the all-gather is inside the step). Step times are logged to the millisecond, so the
  mean (not the median) of ~300 steps is used;
* in-loop: the time the monitoring callback itself takes after each step, as a share of step
  time (printed by the callback at the end of the run).

The tiny model's CPU steps take ~0.05 s; GPU steps of real models take seconds, so the same
absolute in-loop cost is a far smaller share there. ``--ranks 1`` (the default) leaves one of
this machine's two cores to the monitoring processes (node exporter, W&B's service, this
script's scraper), as a GPU node's CPU is not saturated by training (a p5 has 192 vCPUs for 8
GPUs); ``--ranks 2`` saturates both cores, so every CPU cycle monitoring spends anywhere is
taken from a rank: a worst case, not a GPU node.

    python benchmarks/monitoring_overhead.py [--repeats 7] [--steps 300] [--ranks 1]

Last line: ``overhead_percent=<interference + in-loop>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.monitoring.services import free_port_block  # noqa: E402  (the tests' port helper)
TARGET_PERCENT = 1.0
WARMUP_STEPS = 20
_STEP = re.compile(r"^step=(\d+)/\d+ .*step_time_s=([0-9.]+)", re.M)
_IN_LOOP = re.compile(r"monitoring: in-loop overhead ([0-9.]+) ms = ([0-9.]+)%")
_WANDB = re.compile(r"W&B thread CPU ([0-9.]+) ms = ([0-9.]+)%")
PROJECT_STEP_S = (0.1, 0.5, 2.0, 30.0)  # step times to project the measured per-step costs onto


class Scraper(threading.Thread):
    """What Prometheus does: GET every registered target's /metrics, every ``period_s``."""

    def __init__(self, targets_dir: Path, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.targets_dir, self.period_s = targets_dir, period_s
        self.stop = threading.Event()
        self.scrapes = 0
        self.rank_scrapes = 0
        self.rank_scrape_s = 0.0  # wall time of the scrapes a training rank served (its exporter thread)

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            for path in self.targets_dir.glob("*.json"):
                try:
                    groups = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for group in groups:
                    for target in group.get("targets", []):
                        t0 = time.perf_counter()
                        try:
                            urllib.request.urlopen(f"http://{target}/metrics", timeout=2).read()
                        except OSError:
                            continue
                        self.scrapes += 1
                        if ".rank-" in path.name:
                            self.rank_scrape_s += time.perf_counter() - t0
                            self.rank_scrapes += 1


@dataclass(frozen=True)
class Run:
    mean_step_s: float  # after warm-up
    steps_s: float  # sum of rank 0's step times
    in_loop_pct: float  # the monitoring callback after each step (printed by it)
    wandb_pct: float  # CPU of the W&B worker thread (printed by the callback)
    scrape_pct: float  # scrapes of rank exporters: wall time / step time (every rank serves its own)
    scrapes: int
    in_loop_ms: float = 0.0  # per step
    wandb_ms: float = 0.0  # per logged step (log_interval=1 here)
    scrape_ms: float = 0.0  # per scrape of one rank

    @property
    def accounted_pct(self) -> float:
        """Everything monitoring does in the rank processes, as if all of it held the GIL."""
        return self.in_loop_pct + self.wandb_pct + self.scrape_pct


def train(tmp: Path, steps: int, monitored: bool, ranks: int) -> Run:
    runs, targets = tmp / "runs", tmp / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launcher", "config=tiny_local", f"cluster.gpus_per_node={ranks}",
           f"training.train_steps={steps}", f"runs_root={runs}"]
    if monitored:
        cmd += ["monitoring.prometheus=true", f"monitoring.targets_dir={targets}",
                f"monitoring.port_base={free_port_block(4)}", "monitoring.bind_address=127.0.0.1",
                "monitoring.straggler.enabled=true", "monitoring.wandb=true", "monitoring.wandb_mode=offline"]
    else:
        cmd += ["monitoring.straggler.enabled=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYPERLAUNCH_"))}
    env["OMP_NUM_THREADS"] = "1"
    scraper = Scraper(targets)
    scraper.start()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    finally:
        scraper.stop.set()
    match = re.search(r"run directory: (\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    log = (Path(match.group(1)) / "logs" / "local.out").read_text()
    all_times = [float(t) for _, t in _STEP.findall(log)]
    times = [float(t) for s, t in _STEP.findall(log) if int(s) > WARMUP_STEPS]
    in_loop, wandb = _IN_LOOP.search(log), _WANDB.search(log)
    if monitored and (in_loop is None or wandb is None):
        raise SystemExit(f"the monitored run did not print its overhead line:\n{log[-3000:]}")
    per_rank_scrape = scraper.rank_scrape_s / ranks
    n = len(all_times)
    return Run(mean_step_s=statistics.fmean(times), steps_s=sum(all_times),
               in_loop_pct=float(in_loop.group(2)) if in_loop else 0.0,
               wandb_pct=float(wandb.group(2)) if wandb else 0.0,
               scrape_pct=100 * per_rank_scrape / sum(all_times) if monitored else 0.0, scrapes=scraper.scrapes,
               in_loop_ms=float(in_loop.group(1)) / n if in_loop else 0.0,
               wandb_ms=float(wandb.group(1)) / n if wandb else 0.0,
               scrape_ms=1e3 * scraper.rank_scrape_s / max(scraper.rank_scrapes, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=1, help="training processes (DP); see the module docstring")
    args = parser.parse_args()
    off: list[Run] = []
    on: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved pairs, alternating which goes first
            for monitored in ((False, True) if i % 2 == 0 else (True, False)):
                run = train(Path(tmp) / f"{i}-{monitored}", args.steps, monitored, args.ranks)
                (on if monitored else off).append(run)
                extra = (f", {run.scrapes} scrapes; in-loop {run.in_loop_pct:.3f}%, W&B thread {run.wandb_pct:.3f}%, "
                         f"scrapes {run.scrape_pct:.3f}%" if monitored else "")
                print(f"repeat {i + 1}/{args.repeats} monitoring={'on ' if monitored else 'off'} "
                      f"mean step {run.mean_step_s * 1e3:.2f} ms{extra}", file=sys.stderr, flush=True)
    ratios = sorted(a.mean_step_s / b.mean_step_s for a, b in zip(on, off))
    interference = 100 * (statistics.median(ratios) - 1)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"\n{'mean step time per run':28s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for name, runs in (("monitoring off", off), ("monitoring on", on)):
        values = [r.mean_step_s * 1e3 for r in runs]
        print(f"{name:28s} {med(values):10.2f} {min(values):8.2f} {max(values):8.2f}")
    print(f"\nA/B: paired ratios on/off {', '.join(f'{r:.3f}' for r in ratios)}: median {interference:+.2f}%, "
          f"spread {100 * (ratios[-1] - ratios[0]):.1f} points (this machine's noise; it cannot resolve 1%)")
    loop, wandb, scrape = (med([r.in_loop_pct for r in on]), med([r.wandb_pct for r in on]),
                           med([r.scrape_pct for r in on]))
    accounted = med([r.accounted_pct for r in on])
    print(f"accounted in the rank processes (medians, % of step time): in-loop callback {loop:.3f}, W&B worker "
          f"thread CPU {wandb:.3f}, serving scrapes every 1 s {scrape:.3f} (at the default 15 s: "
          f"{scrape / 15:.3f}); total {accounted:.3f} (an upper bound: as if every part held the GIL throughout)")
    per_step = med([r.in_loop_ms for r in on]) + med([r.wandb_ms for r in on])
    scrape_ms = med([r.scrape_ms for r in on])
    print(f"per step: in-loop {med([r.in_loop_ms for r in on]):.3f} ms + W&B {med([r.wandb_ms for r in on]):.3f} ms "
          f"(log_interval=1); per scrape of a rank: {scrape_ms:.2f} ms. Projected share at a 15 s scrape interval: "
          + ", ".join(f"{t:g} s step {100 * (per_step / 1e3 / t + scrape_ms / 1e3 / 15):.3f}%" for t in PROJECT_STEP_S))
    print(f"{args.repeats} pairs x {args.steps} steps, {args.ranks} rank(s), after {WARMUP_STEPS} warm-up steps; "
          f"target < {TARGET_PERCENT}%")
    print(f"overhead_percent={accounted:.2f} ab_interference_percent={interference:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
