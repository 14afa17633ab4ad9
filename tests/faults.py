"""Test-only fault injection, plugged into the real trainer through ``$HYPERLAUNCH_PLUGINS``.

    env = fault_env("slow:rank=1,factor=8,from=45,to=105;fail:rank=1,step=25;hang:rank=1,step=6")

* ``slow``: rank ``rank`` (``*``: every rank) takes ``factor`` x as long in its forward compute,
  from process step ``from`` to ``to`` -- inside the compute interval, as a slow GPU would;
* ``fail``: raises ``RuntimeError("injected test fault (HYPERLAUNCH_TEST_FAULT) at step N")`` in
  the forward of process step N;
* ``hang``: blocks in the forward of process step N, as a hung kernel or collective would, until
  killed; it fires once per run (a marker in the run directory), so the restarted group trains on.
* ``dataslow``: every sample the rank reads takes ``seconds`` longer (a slow filesystem or loader).

Steps are counted by the process (a resumed run starts again at 1). Nothing here ships in the
product: the trainer loads it like any other plugin (trainer/__main__.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

FAULT_ENV = "HYPERLAUNCH_TEST_FAULT"
PLUGIN = "tests.faults:callbacks"


def fault_env(spec: str, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for a trainer (or launcher) process that should suffer these faults."""
    env = dict(os.environ if base is None else base)
    env.update({FAULT_ENV: spec, "HYPERLAUNCH_PLUGINS": PLUGIN})
    return env


@dataclass(frozen=True)
class Fault:
    kind: str  # slow | fail | hang | dataslow
    factor: float = 1.0  # slow: the compute factor; dataslow: seconds per sample
    start: int = 1
    end: int = 1 << 60


def parse(spec: str, rank: int) -> list[Fault]:
    """The faults of ``spec`` that apply to ``rank``; a malformed spec is an error naming it."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        kind, _, args = item.partition(":")
        try:
            kv = dict(a.split("=", 1) for a in args.split(",") if a)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}: {item!r} is not kind:key=value,...") from None
        if kind not in ("slow", "fail", "hang", "dataslow"):
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} (slow, fail, hang, dataslow)")
        who = kv.get("rank", "*")
        if who != "*" and int(who) != rank:
            continue
        if kind == "dataslow":
            faults.append(Fault("dataslow", float(kv.get("seconds", 0.05))))
        elif kind == "slow":
            faults.append(Fault("slow", float(kv.get("factor", 2)), int(kv.get("from", 1)), int(kv.get("to", 1 << 60))))
        else:
            step = int(kv.get("step", 1))
            faults.append(Fault(kind, start=step, end=step))
    return faults


class FaultCallback:
    def __init__(self, faults: list[Fault], rank: int) -> None:
        self.faults, self.rank = faults, rank
        self.step = 1  # process steps: the one the next forward belongs to
        self._t0 = 0.0

    def on_train_start(self, state: Any) -> None:
        for fault in self.faults:
            if fault.kind == "dataslow":
                source = state.extra["source"]
                sample, delay = source.sample, fault.factor

                def slow_sample(index: int, _sample: Any = sample, _delay: float = delay) -> Any:
                    time.sleep(_delay)
                    return _sample(index)

                source.sample = slow_sample
        for chunk in state.model:
            chunk.register_forward_pre_hook(self._before)
            chunk.register_forward_hook(self._after)

    def _before(self, module: Any, args: Any) -> None:
        self._t0 = time.perf_counter()

    def _after(self, module: Any, args: Any, output: Any) -> None:
        elapsed = time.perf_counter() - self._t0
        for fault in self.faults:
            if not fault.start <= self.step <= fault.end:
                continue
            if fault.kind == "slow":
                time.sleep(elapsed * (fault.factor - 1.0))
            elif fault.kind == "fail":
                raise RuntimeError(f"injected test fault ({FAULT_ENV}) at step {self.step}")
            elif fault.kind == "hang" and self._first_hang():
                while True:  # until the watchdog (or a timeout) kills this process
                    time.sleep(3600)

    def _first_hang(self) -> bool:
        marker = Path(os.environ.get("HYPERLAUNCH_RUN_DIR", ".")) / f".fault-hang-rank{self.rank}"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def on_step_end(self, state: Any, report: Any) -> None:
        self.step += 1

    def on_validation(self, state: Any, report: Any) -> None:
        pass

    def on_train_end(self, state: Any, *, finished: bool, error: Optional[BaseException] = None) -> None:
        pass

    def after_shutdown(self, state: Any, *, finished: bool) -> None:
        pass


def callbacks(cfg: Any, layout: Any) -> list[FaultCallback]:
    faults = parse(os.environ.get(FAULT_ENV, ""), layout.rank)
    return [FaultCallback(faults, layout.rank)] if faults else []
