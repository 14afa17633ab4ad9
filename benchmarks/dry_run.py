"""Benchmark: wall time of the 70B / 32 x p5 dry run (target: under 3 s on a 2-core machine).

Measures, side by side in one run, the full CLI dry run against two baselines (bare
interpreter start, and importing hydra + omegaconf) and prints medians and ratios.

    python benchmarks/dry_run.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 3.0


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "import hydra+omegaconf": [sys.executable, "-c", "import hydra, omegaconf"],
            "70B/P5 dry run (32 nodes)": [sys.executable, "-m", "launcher", "config=llama3_70b_p5", "cluster.nodes=32",
                                          "dry_run=true", f"runs_root={tmp}/runs"],
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every case alike
            for name, cmd in cases.items():
                times[name].append(wall(cmd))
    base = statistics.median(times["python -c pass"])
    print(f"{'case':32s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'x python':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:32s} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {med / base:9.1f}")
    dry = statistics.median(times["70B/P5 dry run (32 nodes)"])
    print(f"\ndry run median {dry:.3f} s = {dry / TARGET_S:.2f} x the {TARGET_S:.0f} s target "
          f"({'MET' if dry < TARGET_S else 'MISSED'}), {args.repeats} repeats")
    return 0 if dry < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
