"""What flows into metric sinks: plain frozen records, no torch, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from trainer.progress import RunProgress

ProgressSample = RunProgress  # rank 0's view of the run per step: progress, goodput ledger, plan ratios (plain data)


@dataclass(frozen=True)
class RankIdentity:
    """Where one rank runs: enough to name it in an alert (rank, host and GPU)."""

    rank: int
    local_rank: int
    host: str
    gpu: str  # device index as NVML/DCGM number it ("3"); the local rank on CPU
    gpu_uuid: str = ""  # "GPU-..." on CUDA, "" on CPU
    gpu_name: str = "cpu"
    pp_rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0

    def describe(self) -> str:
        gpu = f"GPU {self.gpu}" + (f" {self.gpu_uuid}" if self.gpu_uuid else f" ({self.gpu_name})")
        return f"rank {self.rank} on {self.host}, {gpu}"


@dataclass(frozen=True)
class RunInfo:
    run: str  # the run directory name: unique per launch, stable across requeues
    run_name: str
    world_size: int
    total_steps: int
    slurm_job: str = ""
    run_dir: Optional[str] = None
    identity: Optional[RankIdentity] = None  # this process


@dataclass(frozen=True)
class StepSample:
    step: int
    total_steps: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    step_time_s: float
    tokens_per_s: float
    tokens: int  # tokens in this step (global batch x sequence)
    tflops_per_gpu: float
    mfu_percent: Optional[float]
    compute_s: float
    data_wait_s: float


@dataclass(frozen=True)
class ValidationSample:
    """One validation pass: loss over every source's held-out tokens and per source."""

    step: int
    loss: float
    perplexity: float
    per_source: dict[str, float] = field(default_factory=dict)  # source label -> loss


class Operation(str, enum.Enum):
    BLOCKING = "blocking"  # the part of a save that stalls training
    SAVE = "save"
    REPLICATION = "replication"


@dataclass(frozen=True)
class CheckpointEvent:
    """One checkpoint operation as the checkpoint code saw it (see monitoring.record_checkpoint)."""

    operation: Operation
    step: int
    seconds: float
    ok: bool = True
    size_bytes: Optional[int] = None
    error: Optional[str] = None  # short reason when not ok
    timestamp: float = 0.0


class Level(str, enum.Enum):
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Alert:
    title: str  # stable per kind of event: W&B suppresses repeats by title
    text: str
    level: Level = Level.WARN
    terminal: bool = False  # job started/finished/failed: never dropped by the hourly cap


@dataclass(frozen=True)
class RankScore:
    rank: int
    window_median_s: float
    reference_s: float  # the group's reference median (median of its faster half)
    relative: float  # reference / this rank's median, capped at 1 (1 = as fast as the reference)
    individual: float  # this rank's best past median / its current median
    score: float  # min(relative / (1 - peer_tolerance), individual / the group's reference individual)
    flagged: bool


@dataclass(frozen=True)
class StragglerReport:
    """One detection interval, the same on every rank."""

    step: int
    scores: tuple[RankScore, ...]
    raised: tuple[int, ...] = ()  # ranks newly flagged this interval
    cleared: tuple[int, ...] = ()
    identities: dict[int, RankIdentity] = field(default_factory=dict, compare=False)

    @property
    def flagged(self) -> tuple[int, ...]:
        return tuple(s.rank for s in self.scores if s.flagged)


@dataclass(frozen=True)
class ThroughputReport:
    step: int
    tokens_per_s: float  # window median
    baseline: float
    dropped: bool
    changed: bool  # dropped switched this interval


@dataclass(frozen=True)
class Outcome:
    state: str  # finished | stopped | failed
    step: int
    reason: str = ""  # failed: "ExcType: message" of the root cause
    failed_rank: Optional[int] = None
    details: str = ""  # traceback and log tail (already redacted)
