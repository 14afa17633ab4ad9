"""Benchmark: what monitoring costs the training step (target: under 1%).

Side by side in one run, interleaved: the same 2-rank CPU training (``config=tiny_local``, DP=2,
gloo) with monitoring OFF and ON. ON is everything a job gets: a Prometheus exporter per rank
scraped every second by this script (15x the default rate), the node exporter, the straggler
detector (one all-gather every ``interval_steps``), W&B in offline mode and the Pushgateway-less
job metrics. Two parts are reported and added:

* interference: mean ``step_time_s`` ON / OFF - 1, per interleaved pair of runs, the median over
  the pairs (exporter threads, scrapes, the W&B process and the straggler all-gather compete with
  the step; the all-gather is inside the step). Step times are logged to the millisecond, so the
  mean (not the median) of ~300 steps is used;
* in-loop: the time the monitoring callback itself takes after each step, as a share of step
  time (printed by the callback at the end of the run).

The tiny model's CPU steps take ~0.1 s; GPU steps of real models take seconds, so the same
absolute cost is a far smaller share there: these numbers are an upper bound.

    python benchmarks/monitoring_overhead.py [--repeats 5] [--steps 300]

Last line: ``overhead_percent=<interference + in-loop>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_PERCENT = 1.0
WARMUP_STEPS = 20
_STEP = re.compile(r"^step=(\d+)/\d+ .*step_time_s=([0-9.]+)", re.M)
_IN_LOOP = re.compile(r"monitoring: in-loop overhead [0-9.]+ ms = ([0-9.]+)% of")


def free_port_block(size: int) -> int:
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + size < 65000 and all(_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Scraper(threading.Thread):
    """What Prometheus does: GET every registered target's /metrics, every ``period_s``."""

    def __init__(self, targets_dir: Path, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.targets_dir, self.period_s = targets_dir, period_s
        self.stop = threading.Event()
        self.scrapes = 0

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            for path in self.targets_dir.glob("*.json"):
                try:
                    groups = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for group in groups:
                    for target in group.get("targets", []):
                        try:
                            urllib.request.urlopen(f"http://{target}/metrics", timeout=2).read()
                            self.scrapes += 1
                        except OSError:
                            pass


def train(tmp: Path, steps: int, monitored: bool) -> tuple[float, float | None, int]:
    """(mean step_time_s after warm-up, in-loop overhead %, scrapes) of one run."""
    runs, targets = tmp / "runs", tmp / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launcher", "config=tiny_local", "cluster.gpus_per_node=2",
           f"training.train_steps={steps}", f"runs_root={runs}"]
    if monitored:
        cmd += ["monitoring.prometheus=true", f"monitoring.targets_dir={targets}",
                f"monitoring.port_base={free_port_block(4)}", "monitoring.bind_address=127.0.0.1",
                "monitoring.wandb=true", "monitoring.wandb_mode=offline", "monitoring.straggler.enabled=true"]
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
    times = [float(t) for s, t in _STEP.findall(log) if int(s) > WARMUP_STEPS]
    in_loop = _IN_LOOP.search(log)
    return statistics.fmean(times), float(in_loop.group(1)) if in_loop else None, scraper.scrapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    off: list[float] = []
    on: list[float] = []
    in_loop: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved pairs, alternating which goes first
            for monitored in ((False, True) if i % 2 == 0 else (True, False)):
                mean, share, scrapes = train(Path(tmp) / f"{i}-{monitored}", args.steps, monitored)
                (on if monitored else off).append(mean)
                if share is not None:
                    in_loop.append(share)
                print(f"repeat {i + 1}/{args.repeats} monitoring={'on ' if monitored else 'off'} "
                      f"mean step {mean * 1e3:.2f} ms" + (f", {scrapes} scrapes, in-loop {share:.3f}%"
                                                          if monitored and share is not None else ""),
                      file=sys.stderr, flush=True)
    ratios = sorted(a / b for a, b in zip(on, off))
    interference = 100 * (statistics.median(ratios) - 1)
    loop = statistics.median(in_loop) if in_loop else 0.0
    print(f"\n{'mean step time per run':24s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s}")
    for name, values in (("monitoring off", off), ("monitoring on", on)):
        print(f"{name:24s} {statistics.median(values) * 1e3:10.2f} {min(values) * 1e3:8.2f} {max(values) * 1e3:8.2f}")
    print(f"\npaired ratios on/off: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.4f} "
          f"(interference {interference:+.2f}%, spread of the pairs {100 * (ratios[-1] - ratios[0]):.1f} points); "
          f"in-loop callback {loop:.3f}% of step time; {args.repeats} pairs x {args.steps} steps, 2 ranks, "
          f"after {WARMUP_STEPS} warm-up steps; target < {TARGET_PERCENT}%")
    print(f"overhead_percent={interference + loop:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
