"""Benchmark: wall time of the predictor's command line (target: 70B search on 1024 H100 < 1 s).

Runs the cases interleaved (machine noise hits every case alike) and prints medians, min,
max and the ratio to a bare interpreter start. Every case is a fresh process, so the times
include interpreter start and imports, as a user or a script sees them.

    python benchmarks/predictor_search_speed.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
SEARCH_70B = ["-m", "memory_predictor", "search", "--model", "llama3.3_70b", "--gpu", "h100-80gb", "--nodes", "128",
              "--gpus-per-node", "8", "--seq", "8192", "--gbs", "1024"]
CASES = {
    "python -c pass": ["-c", "pass"],
    "import memory_predictor.cli": ["-c", "import memory_predictor.cli"],
    "evaluate 70B (json)": ["-m", "memory_predictor", "evaluate", "--model", "llama3.3_70b", "--gpu", "h100-80gb",
                            "--tp", "8", "--pp", "4", "--vpp", "5", "--dp", "8", "--gbs", "1024", "--seq", "8192", "--json"],
    "search 70B / 1024 H100 (json)": [*SEARCH_70B, "--json"],
    "search 70B / 1024 H100 (rich table)": SEARCH_70B,
    "plan 70B / 1024 H100, 15T tokens (json)": [*SEARCH_70B[:2], "plan", *SEARCH_70B[3:], "--tokens", "15T", "--json"],
    # 126 layers x 1008 GPUs: the most layouts of our models (13k), a worst case for the enumeration
    "search 405B / 1008 H100 (json)": [*SEARCH_70B[:4], "llama3.1_405b", "--gpu", "h100-80gb", "--nodes", "126",
                                       "--gpus-per-node", "8", "--seq", "8192", "--gbs", "1008", "--json"],
}


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, argv in CASES.items():
            times[name].append(wall(argv))
    base = statistics.median(times["python -c pass"])
    print(f"{'case':42s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'x python':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42s} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {med / base:9.1f}")
    search = statistics.median(times["search 70B / 1024 H100 (json)"])
    print(f"\nsearch median {search:.3f} s = {search / TARGET_S:.2f} x the {TARGET_S:.0f} s target "
          f"({'MET' if search < TARGET_S else 'MISSED'}), {args.repeats} interleaved repeats")
    return 0 if search < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
