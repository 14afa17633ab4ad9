"""Straggler detection on simulated ranks: detection delay and false alarms under realistic noise.

    python benchmarks/straggler_detection.py [--ranks 64] [--steps 12000] [--seeds 5]

The simulated per-rank compute time (what trainer.timing measures) is

    base x (1 + persistent rank offset) x (1 + job-wide drift) x job-wide episode x jitter
    + GC pauses + data-loader contention + one-off spikes + short bursts

* persistent rank offset: N(0, 1.5%) clipped to +-4% (silicon and cooling differences)
* job-wide drift: +-3% sine over 3,000 steps (clocks/thermals); every rank at once
* job-wide episode: all ranks 40% slower for 600 steps, about 30% fewer tokens/s (must NOT flag
  stragglers; it is what the throughput-drop watch is for)
* jitter: log-normal, sigma 2% per step and rank
* GC pauses: every 80-250 steps per rank (own period and phase), +30-120 ms
* data-loader hiccups: 0.5% of rank-steps; 30% of them leak 2-15% into compute (CPU contention)
* one-off spikes: 0.1% of rank-steps, x1.5-4
* short bursts: 0.05% of rank-steps start 2-5 steps at x1.05-1.3 (a noisy neighbour), at most one
  per 100 steps and rank
* the job's tokens/s: 1 / (slowest rank + 50 ms of communication), times a job-wide log-normal
  jitter of sigma 15% per step (storage, network, data loading)

What counts as noise: anything that slows a rank for fewer than half the steps of a detection
interval. A rank slower for more than half of ``consecutive`` intervals in a row IS flagged, by
design, even if it recovers later (the flag clears after ``consecutive`` good intervals).

Detection runs: one rank becomes 10%, 20% or 50% slower at a random step (random phase within a
detection interval) and stays slow; the delay is the number of interval boundaries from the
slowdown to the flag (worst over the seeds). False alarms: flags raised on healthy ranks in every
run, plus a clean run of the same length with no straggler at all. Throughput: in the clean runs
the watch must raise the episode within 100 steps, clear it (when it ends, or once it fills most
of the baseline window: the new normal), and change state nowhere else.

The last line is machine-readable: ``detect_intervals_10pct=<n> detect_intervals_20pct=<n>
detect_intervals_50pct=<n> false_alarms=<n> throughput_false_changes=<n>``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.monitoring_config import StragglerConfig  # noqa: E402
from monitoring.straggler import RankWindow, StragglerDetector, ThroughputWatch  # noqa: E402

BASE_S = 0.35  # compute seconds of one step on one rank
EPISODE = (6000, 6600)  # job-wide slowdown


class NoiseModel:
    def __init__(self, ranks: int, rng: np.random.Generator):
        self.rng = rng
        self.ranks = ranks
        self.offset = np.clip(rng.normal(0, 0.015, ranks), -0.04, 0.04)
        self.gc_period = rng.integers(80, 251, ranks)
        self.gc_phase = rng.integers(0, 250, ranks)
        self.burst_left = np.zeros(ranks, dtype=int)
        self.burst_factor = np.ones(ranks)
        self.burst_start = np.full(ranks, -1000)

    def step(self, t: int) -> tuple[np.ndarray, float]:
        """Compute seconds of every rank at step t, and the job's tokens/s factor."""
        rng, n = self.rng, self.ranks
        drift = 1 + 0.03 * math.sin(2 * math.pi * t / 3000)
        episode = 1.4 if EPISODE[0] <= t < EPISODE[1] else 1.0
        c = BASE_S * (1 + self.offset) * drift * episode * rng.lognormal(0, 0.02, n)
        gc = (t + self.gc_phase) % self.gc_period == 0
        c += gc * rng.uniform(0.03, 0.12, n)
        hiccup = rng.random(n) < 0.005
        leak = hiccup & (rng.random(n) < 0.3)
        c *= 1 + leak * rng.uniform(0.02, 0.15, n)
        spike = rng.random(n) < 0.001
        c *= np.where(spike, rng.uniform(1.5, 4.0, n), 1.0)
        start = (self.burst_left == 0) & (t - self.burst_start >= 100) & (rng.random(n) < 0.0005)
        self.burst_start = np.where(start, t, self.burst_start)
        self.burst_left = np.where(start, rng.integers(2, 6, n), self.burst_left)
        self.burst_factor = np.where(start, rng.uniform(1.05, 1.3, n), self.burst_factor)
        c *= np.where(self.burst_left > 0, self.burst_factor, 1.0)
        self.burst_left = np.maximum(self.burst_left - 1, 0)
        # the job's step time follows its slowest rank (collectives wait for it)
        return c, self.tokens_per_s(c)

    def tokens_per_s(self, c: np.ndarray) -> float:
        return float(self.rng.lognormal(0, 0.15)) / (float(c.max()) + 0.05)


def simulate(ranks: int, steps: int, seed: int, cfg: StragglerConfig, slow_rank: int | None = None,
             slow_factor: float = 1.0, slow_from: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    noise = NoiseModel(ranks, rng)
    detector = StragglerDetector(cfg)
    watch = ThroughputWatch(cfg)
    window = np.zeros((cfg.interval_steps, ranks))
    tokens = np.zeros(cfg.interval_steps)
    false_alarms, detected_at, drops = 0, None, []
    for t in range(1, steps + 1):
        c, tps = noise.step(t)
        if slow_rank is not None and t >= slow_from:
            c[slow_rank] *= slow_factor
            tps = noise.tokens_per_s(c)
        i = (t - 1) % cfg.interval_steps
        window[i], tokens[i] = c, tps
        if t % cfg.interval_steps or t <= cfg.warmup_steps:
            continue
        medians = np.sort(window, axis=0)[(cfg.interval_steps - 1) // 2]  # = window_median (lower median)
        report = detector.update(t, [RankWindow(r, 0, float(medians[r])) for r in range(ranks)])
        for r in report.raised:
            if r == slow_rank and t >= slow_from:
                detected_at = detected_at or t
            else:
                false_alarms += 1
        if watch.update(t, float(np.median(tokens))).changed:
            drops.append(t)
    delay = None
    if detected_at is not None:
        # intervals that contained slow steps, the partial first one and the flagging one included
        delay = (detected_at - 1) // cfg.interval_steps - (slow_from - 1) // cfg.interval_steps + 1
    return {"false_alarms": false_alarms, "delay": delay, "throughput_changes": drops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = StragglerConfig()
    started = time.perf_counter()
    print(f"config: interval_steps={cfg.interval_steps} raise_score={cfg.raise_score} clear_score={cfg.clear_score} "
          f"consecutive={cfg.consecutive}; {args.ranks} ranks x {args.steps} steps per run, {args.seeds} seeds")
    false_alarms = throughput_false = 0
    clean = [simulate(args.ranks, args.steps, 1000 + s, cfg) for s in range(args.seeds)]
    for s, res in enumerate(clean):
        changes: list[int] = res["throughput_changes"]
        # raised within 100 steps; cleared when the episode ends or once it is most of the baseline window
        ok = (len(changes) == 2 and EPISODE[0] < changes[0] <= EPISODE[0] + 100
              and changes[0] < changes[1] <= EPISODE[1] + 100)
        throughput_false += 0 if ok else max(1, abs(len(changes) - 2))
        print(f"clean run seed={s}: false_alarms={res['false_alarms']} throughput drop raised/cleared at steps "
              f"{changes} (job-wide episode at {EPISODE[0]}-{EPISODE[1]}){'' if ok else ' WRONG'}")
        false_alarms += int(res["false_alarms"])
    worst: dict[int, int] = {}
    for pct in (10, 20, 50):
        delays = []
        for s in range(args.seeds):
            rng = np.random.default_rng(s)
            slow_rank = int(rng.integers(0, args.ranks))
            slow_from = int(rng.integers(2000, args.steps - 4000))
            res = simulate(args.ranks, args.steps, s, cfg, slow_rank, 1 + pct / 100, slow_from)
            false_alarms += int(res["false_alarms"])
            delay = res["delay"]
            delays.append(10**9 if delay is None else int(delay))
            print(f"{pct}% slow rank {slow_rank} from step {slow_from} (seed {s}): flagged after "
                  f"{'never' if delay is None else delay} intervals, false_alarms={res['false_alarms']}")
        worst[pct] = max(delays)
    total_steps = args.steps * args.seeds * 4
    print(f"{total_steps} simulated steps x {args.ranks} ranks in {time.perf_counter() - started:.1f} s")
    print(f"detect_intervals_10pct={worst[10]} detect_intervals_20pct={worst[20]} "
          f"detect_intervals_50pct={worst[50]} false_alarms={false_alarms} throughput_false_changes={throughput_false}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
