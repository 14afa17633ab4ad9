"""Recovery time: from a killed rank, or a hung one, to the first step after the in-job restart.

    python benchmarks/recovery_time.py [--repeats 3] [--timeout-s 60]

Three scenarios, each a real local run through the launcher (2 CPU ranks, gloo, tiny model,
a checkpoint every 10 steps, ``resilience.max_restarts=1``), each repeated:

* ``killed``: rank 1 is SIGKILLed after step 15 (a crashed process, an OOM kill);
* ``hung (watchdog)``: rank 1 blocks in its forward of step 15 (a hung kernel or collective);
  the watchdog (floor 5 s, polled every second) ends the worker group;
* ``hung (timeout only)``: the same hang with the watchdog off: the peer's collective fails after
  ``resilience.collective_timeout_s`` (``--timeout-s``, default 60 s to keep the benchmark short;
  PyTorch's NCCL default is 600 s, and the table extrapolates to it). Its restart includes
  torchrun's 30 s grace for the hung rank, which does not answer SIGTERM.

Each recovery is split into detection (the failure to the moment it is noticed: torchrun reports
the dead worker, or the watchdog's verdict, or the collective's timeout), restart (to the new
process's start), checkpoint load (process start to its first step: imports, model build, resume)
and redone work (steps trained again since the last commit). Numbers come from the run's goodput
ledger (``goodput.json``), the watchdog's event and torchrun's own log line, read back after the
run. Medians over the repeats; the machine is noisy, so compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import fault_env  # noqa: E402  (test-only fault plugin: the hang)

STEPS, INTERVAL, AT = 40, 10, 15
COMMON = ["config=tiny_local", "cluster.gpus_per_node=2", f"training.train_steps={STEPS}", "training.precision=fp32",
          "checkpoint.enabled=true", f"checkpoint.save_interval={INTERVAL}", "resilience.max_restarts=1",
          "monitoring.prometheus=false", "monitoring.straggler.enabled=false"]
FAILED = re.compile(r"failed \(exitcode: -?\d+\) local_rank")
# torchrun's own log prefix (glog style, local time): E1204 13:52:50.263000 7520 .../api.py:1002] failed ...
GLOG = re.compile(r"\b[EWI](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) \d+ ")


def logged_at(line: str, read_at: float) -> float:
    """When torchrun wrote the line (its own timestamp): the time it is read here lags by the launcher's
    output relay, which made the restart after a killed rank come out negative."""
    m = GLOG.search(line)
    if not m:
        return read_at
    month, day, hh, mm, ss, us = map(int, m.groups())
    year = time.localtime(read_at).tm_year
    t = time.mktime((year, month, day, hh, mm, ss, 0, 0, -1)) + us / 1e6
    return t if abs(t - read_at) < 300 else read_at  # a year boundary or a clock oddity: the read time


@dataclass
class Recovery:
    scenario: str
    detection_s: float
    restart_s: float
    reload_s: float
    redone_s: float
    redone_steps: int

    @property
    def to_first_step_s(self) -> float:
        return self.detection_s + self.restart_s + self.reload_s


class Run:
    def __init__(self, overrides: list[str], env: dict[str, str], root: Path) -> None:
        self.root = root
        cmd = [sys.executable, "-m", "launcher", *COMMON, f"runs_root={root}", *overrides]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            for t, line in self.lines:
                if re.search(pattern, line):
                    return t
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{pattern!r} never appeared:\n" + "\n".join(ln for _, ln in self.lines[-40:]))
            time.sleep(0.02)

    def finish(self, timeout: float) -> Path:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        if rc != 0:
            raise RuntimeError(f"run failed ({rc}):\n" + "\n".join(ln for _, ln in self.lines[-40:]))
        (run_dir,) = [p for p in self.root.iterdir() if (p / "goodput.json").exists()]
        return run_dir


def _restart(run_dir: Path) -> dict:
    ledger = json.loads((run_dir / "goodput.json").read_text())
    if ledger["attempts"] != 2 or len(ledger["restarts"]) != 1:
        raise RuntimeError(f"expected exactly one restart, the ledger says {ledger['attempts']} attempts")
    return dict(ledger["restarts"][0])


def _rank_pid(launcher_pid: int, rank: str) -> int:
    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "trainer" in " ".join(proc.cmdline()) and proc.environ().get("RANK") == rank \
                    and "torch.distributed.run" not in " ".join(proc.cmdline()):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise RuntimeError(f"no trainer process of rank {rank}")


def killed(root: Path) -> Recovery:
    run = Run([], dict(os.environ), root)
    run.wait_for(rf"^step={AT}/", timeout=300)
    os.kill(_rank_pid(run.proc.pid, "1"), signal.SIGKILL)
    t_kill = time.time()
    run_dir = run.finish(timeout=300)
    noticed = next(logged_at(line, t) for t, line in run.lines if t >= t_kill and FAILED.search(line))
    r = _restart(run_dir)
    return Recovery("killed rank", noticed - t_kill, r["process_start"] - noticed, r["reload_s"], r["redone_s"],
                    r["redone_steps"])


def hung(root: Path, watchdog: bool, timeout_s: float) -> Recovery:
    overrides = (["resilience.floor_s=5", "resilience.poll_s=1", "resilience.startup_s=120"] if watchdog
                 else ["resilience.watchdog=false", f"resilience.collective_timeout_s={timeout_s}"])
    run = Run(overrides, fault_env(f"hang:rank=1,step={AT + 1}"), root)
    run_dir = run.finish(timeout=300 + timeout_s)
    r = _restart(run_dir)
    if watchdog:
        (event,) = [json.loads(p.read_text()) for p in (run_dir / "hangs").glob("attempt-*.json")]
        last, noticed = float(event["last_progress"]), float(event["detected"])
    elif r.get("detection_s") is not None:  # rank 0's collective raised: the ledger has its time
        noticed = r["process_start"] - r["down_s"]  # the failure ("down" runs from it to the new process)
        last = noticed - r["detection_s"]  # the newest heartbeat before it
    else:
        raise RuntimeError(f"the restart record has no failure time: {r}")
    name = "hung rank (watchdog)" if watchdog else f"hung rank (timeout {timeout_s:g} s only)"
    return Recovery(name, noticed - last, r["process_start"] - noticed, r["reload_s"], r["redone_s"],
                    r["redone_steps"])


def median(rows: list[Recovery]) -> Recovery:
    return Recovery(rows[0].scenario, *(statistics.median(getattr(r, f) for r in rows) for f in
                                        ("detection_s", "restart_s", "reload_s", "redone_s")),
                    int(statistics.median(r.redone_steps for r in rows)))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="the collective timeout of the third scenario")
    args = parser.parse_args(argv)
    results: list[Recovery] = []
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        for name, scenario in (("killed", lambda d: killed(d)), ("watchdog", lambda d: hung(d, True, 0.0)),
                               ("timeout", lambda d: hung(d, False, args.timeout_s))):
            rows = []
            for i in range(args.repeats):
                root = Path(tmp) / f"{name}-{i}"
                root.mkdir()
                rows.append(scenario(root))
                r = rows[-1]
                print(f"  {r.scenario} #{i + 1}: to first step {r.to_first_step_s:.1f} s (detection {r.detection_s:.1f}, "
                      f"restart {r.restart_s:.1f}, reload {r.reload_s:.1f})", flush=True)
            results.append(median(rows))
    print(f"\nmedians over {args.repeats} runs (2 CPU ranks, tiny model; seconds)")
    print(f"{'scenario':<46}{'detection':>10}{'restart':>9}{'ckpt load':>10}{'to 1st step':>12}"
          f"{'redone':>8}{' (steps)':>9}")
    for r in results:
        print(f"{r.scenario:<46}{r.detection_s:>10.1f}{r.restart_s:>9.1f}{r.reload_s:>10.1f}{r.to_first_step_s:>12.1f}"
              f"{r.redone_s:>8.1f}{r.redone_steps:>9d}")
    watchdog, timeout = results[1], results[2]
    default = timeout.to_first_step_s - timeout.detection_s + 600.0
    print(f"{'hung rank (NCCL default 600 s, extrapolated)':<46}{600.0:>10.1f}{timeout.restart_s:>9.1f}"
          f"{timeout.reload_s:>10.1f}{default:>12.1f}")
    print(f"\nratios: timeout-only / watchdog = {timeout.to_first_step_s / watchdog.to_first_step_s:.1f}x at "
          f"{args.timeout_s:g} s, {default / watchdog.to_first_step_s:.1f}x at the 600 s default; "
          f"killed rank / watchdog hang = {results[0].to_first_step_s / watchdog.to_first_step_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
