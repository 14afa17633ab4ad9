"""Extension points of the training loop: checkpointing and monitoring plug in here.

The loop calls, in order: ``on_train_start`` (a checkpoint callback may restore state and
set ``state.step``), ``on_step_end`` after every optimizer step, and ``on_train_end`` once
(``finished=False`` when a stop was requested; ``error`` set when training raised). Callbacks are
built by their own packages from the typed config (checkpointing.training, monitoring.training)
and composed by the entry point (``python -m trainer``); the loop knows only this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from cluster.heartbeat import HeartbeatWriter
from configs.schema import RootConfig
from trainer.distributed import Layout
from trainer.progress import Notice, RunProgress


@dataclass
class TrainState:
    """What a callback may read (and, for resume, restore) on this rank."""

    cfg: RootConfig
    layout: Layout
    model: list[Any]  # megatron DDP model chunks (one per virtual stage)
    optimizer: Any  # megatron optimizer
    lr_schedule: Any  # trainer.optim schedule (state_dict / load_state_dict)
    total_steps: int
    step: int = 0  # last completed optimizer step; data position is derived from it
    extra: dict[str, Any] = field(default_factory=dict)
    heartbeat: Optional[HeartbeatWriter] = None  # what the hang watchdog reads (cluster.heartbeat)
    on_phase: Optional[Callable[[str], None]] = None  # the goodput ledger books time per phase (trainer.tracker)

    def beat(self, phase: str, step: Optional[int] = None) -> None:
        """Tell the watchdog (and the goodput ledger) where this rank is (``checkpoint``, ``validation``,
        ``step_end``...)."""
        if self.heartbeat is not None:
            self.heartbeat.beat(self.step if step is None else step, phase)
        if self.on_phase is not None:
            self.on_phase(phase)

    @property
    def consumed_samples(self) -> int:
        return self.step * self.cfg.training.global_batch_size


@dataclass(frozen=True)
class StepReport:
    """One optimizer step as this rank saw it (loss and throughput are global)."""

    step: int
    total_steps: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu_percent: Optional[float]
    compute_s: float  # this rank's forward compute time (no collectives): the straggler signal
    data_wait_s: float  # time spent waiting for the next micro-batch
    run: Optional[RunProgress] = None  # rank 0: progress, ETA, goodput ledger, plan ratios (trainer.tracker)
    notices: tuple[Notice, ...] = ()  # rank 0: milestones, restarts, plan drift reached at this step


class TrainingCallback(Protocol):
    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, report: StepReport) -> None: ...

    def on_validation(self, state: TrainState, report: Any) -> None:
        """A validation pass finished (``trainer.evaluation.ValidationReport``: loss per source and overall)."""

    def on_train_end(self, state: TrainState, *, finished: bool, error: Optional[BaseException] = None) -> None:
        """``error`` is set when training raised: do not start collectives (peers may be gone)."""

    def after_shutdown(self, state: TrainState, *, finished: bool) -> None:
        """Once the process group is gone (no collectives): long single-rank work such as an export,
        which must not keep the other ranks waiting in a collective that could time out."""


CallbackFactory = Callable[[RootConfig, Layout], "list[TrainingCallback]"]
"""Builds this rank's callbacks once the process group exists (the entry point supplies it)."""


def no_callbacks(cfg: RootConfig, layout: Layout) -> list[TrainingCallback]:
    return []
