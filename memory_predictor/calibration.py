"""A cluster's own calibration: refit the throughput efficiencies and memory overheads from its runs.

The shipped constants (memory_predictor.constants) were fitted to published runs of other
clusters. A calibration refits, for one cluster type (``gpu_type``), what that cluster's
measured runs can pin down, each only when the runs exercise it:

* ``compute`` (the achieved fraction of peak; on CPU a factor on the nominal rate) - always;
* ``gemm_half_flops`` (per-token work that does not shrink with the GEMMs: launches, memory-bound
  kernels, eager-mode overhead on CPU) - when the runs have at least two per-rank GEMM sizes
  (micro batch, TP or CP differ);
* ``nvlink`` and ``nvlink_latency_s`` (achieved fraction of the intra-node bandwidth, per-collective
  latency) - when a run communicates inside a node (TP, PP, DP or CP > 1);
* ``network`` and ``network_latency_s`` - when a run spans nodes;
* memory: ``allocator_margin_fraction`` from measured ``max_memory_reserved / max_memory_allocated``
  (GPU runs), ``host_process_bytes`` from measured max RSS minus the predicted model bytes (CPU runs).
  CUDA context and NCCL buffers lie outside what the trainer measures, so they stay as shipped.

The fit is least squares on log(predicted / measured) step time (ratios: 0.8x and 1.25x weigh
alike) over the parameters above, on a log scale: a Nelder-Mead simplex (``compute`` and
``gemm_half_flops`` trade off along a narrow valley), then coordinate descent with the
golden-section searches that fitted the shipped constants (memory_predictor.fitting), with a
very weak pull toward the starting values so that a direction the runs do not see stays put. Pure: samples in,
a frozen result out; ``calibration_yaml`` / ``read_calibration`` are the file format.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from memory_predictor import constants as C
from memory_predictor.errors import PredictorError, Problem
from memory_predictor.fitting import minimise
from memory_predictor.runs import RunInputs
from memory_predictor.search import evaluate

VERSION = 1
#: Weight of the pull toward the starting value, per parameter, in squared log units.
RIDGE = 1e-6
#: Without a calibration the CPU profile runs at its nominal rate with no per-operation term; the
#: fit starts there (a half point far below any GEMM, i.e. none).
CPU_START_HALF_FLOPS = 1e3
BOUNDS: dict[str, tuple[float, float]] = {
    "compute": (0.02, 1.0), "gemm_half_flops": (1e2, 1e14), "nvlink": (1e-5, 1.0), "nvlink_latency_s": (1e-7, 1.0),
    "network_latency_s": (1e-7, 1.0), "network": (0.02, 1.0)}
CPU_COMPUTE_BOUNDS = (1e-3, 1e3)  # a factor on the CPU profile's nominal rate, not a fraction of a peak
PARAMETERS = ("compute", "gemm_half_flops", "nvlink", "nvlink_latency_s", "network_latency_s", "network")


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """What one cluster type actually does; ``efficiency()`` / ``overheads()`` apply it."""

    gpu_type: str
    compute: float
    gemm_half_flops: float
    nvlink_latency_s: float
    network_latency_s: float
    nvlink: float = 1.0
    network: float
    allocator_margin_fraction: float
    host_process_bytes: int
    fitted: tuple[str, ...] = ()  # the parameters the runs determined; the rest are the starting values
    runs: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()
    step_time_error: Mapping[str, float | None] | None = None  # MAPE before/after, fitted and held-out runs

    @property
    def family(self) -> str:
        return C.gpu_family(self.gpu_type)

    def efficiency(self, base: C.Efficiency = C.EFFICIENCY) -> C.Efficiency:
        return replace(base, compute={**base.compute, self.family: self.compute},
                       gemm_half_flops_family={**base.gemm_half_flops_family, self.family: self.gemm_half_flops},
                       nvlink=self.nvlink, nvlink_latency_s=self.nvlink_latency_s,
                       network_latency_s=self.network_latency_s,
                       network=self.network)

    def overheads(self, base: C.Overheads = C.OVERHEADS) -> C.Overheads:
        return replace(base, allocator_margin_fraction=self.allocator_margin_fraction,
                       host_process_bytes=self.host_process_bytes)

    def problems_for(self, gpu_type: str, field: str) -> list[Problem]:
        """A calibration belongs to the cluster type it was measured on."""
        if gpu_type == self.gpu_type:
            return []
        return [Problem(field, gpu_type, f"the calibration was measured on gpu_type={self.gpu_type}; use one made on "
                        f"{gpu_type} runs (python -m memory_predictor calibrate --runs <runs of this cluster>)")]

    def as_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "gpu_type": self.gpu_type,
                "efficiency": {name: getattr(self, name) for name in PARAMETERS},
                "overheads": {"allocator_margin_fraction": self.allocator_margin_fraction,
                              "host_process_bytes": self.host_process_bytes},
                "fitted": list(self.fitted), "runs": list(self.runs), "held_out": list(self.held_out),
                "step_time_error": dict(self.step_time_error) if self.step_time_error else None}


def start_values(gpu_type: str, eff: C.Efficiency = C.EFFICIENCY, overheads: C.Overheads = C.OVERHEADS) -> Calibration:
    """The calibration that reproduces the predictor as it stands (what a fit starts from)."""
    cpu = gpu_type == "cpu" and "cpu" not in eff.compute
    return Calibration(gpu_type=gpu_type, compute=1.0 if cpu else eff.compute_for(gpu_type),
                       gemm_half_flops=CPU_START_HALF_FLOPS if cpu else eff.half_for(gpu_type),
                       nvlink=eff.nvlink, nvlink_latency_s=eff.nvlink_latency_s,
                       network_latency_s=eff.network_latency_s,
                       network=eff.network, allocator_margin_fraction=overheads.allocator_margin_fraction,
                       host_process_bytes=overheads.host_process_bytes)


# --------------------------------------------------------------------------- samples and the fit


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured run: the predictor's inputs and what the logs say."""

    name: str
    inputs: RunInputs
    step_time_s: float | None
    memory_kind: str | None = None  # cuda | cpu_max_rss
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    held_out: bool = False  # evaluated, not fitted


@dataclass(frozen=True, slots=True)
class SampleResult:
    name: str
    held_out: bool
    layout: str
    measured_step_s: float | None
    before_step_s: float
    after_step_s: float
    memory_compared: str  # what the memory columns compare
    measured_memory: int | None
    before_memory: int
    after_memory: int

    @property
    def before_error(self) -> float | None:
        return self.before_step_s / self.measured_step_s - 1 if self.measured_step_s else None

    @property
    def after_error(self) -> float | None:
        return self.after_step_s / self.measured_step_s - 1 if self.measured_step_s else None


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    calibration: Calibration
    start: Calibration
    samples: tuple[SampleResult, ...]


def _predict(sample: Sample, cal: Calibration, base_eff: C.Efficiency, base_over: C.Overheads) -> tuple[float, int]:
    """(step time, the memory that is compared with the measurement)."""
    i = sample.inputs
    report, step = evaluate(i.model, i.train, i.layout, i.opts, i.hw, eff=cal.efficiency(base_eff),
                            overheads=cal.overheads(base_over))
    peak = report.peak
    memory = peak.total if sample.memory_kind == "cpu_max_rss" else peak.reserved
    return step.step_time_s, memory


def layout_label(i: RunInputs) -> str:
    lay = i.layout
    label = f"tp{lay.tp} pp{lay.pp}" + (f" vpp{lay.vpp}" if lay.vpp > 1 else "") + f" cp{lay.cp} dp{lay.dp}"
    label += f" mbs{i.train.micro_batch_size} gbs{i.train.global_batch_size}"
    label += "" if lay.recompute == "none" else f" {lay.recompute}"
    return label + f" on {i.hw.nodes}x{i.hw.gpus_per_node}"


def _active(samples: Sequence[Sample]) -> list[str]:
    """The parameters these runs exercise (module docstring)."""
    active = ["compute"]
    gemms = {(s.inputs.train.micro_batch_size * s.inputs.train.seq_length // s.inputs.layout.cp, s.inputs.layout.tp)
             for s in samples}
    if len(gemms) >= 2:
        active.append("gemm_half_flops")
    if any((s.inputs.layout.world > 1 and s.inputs.hw.nodes == 1) or s.inputs.layout.tp > 1 for s in samples):
        active += ["nvlink", "nvlink_latency_s"]
    if any(s.inputs.hw.nodes > 1 for s in samples):
        active += ["network", "network_latency_s"]
    return active


def _with_params(cal: Calibration, p: Mapping[str, float]) -> Calibration:
    return replace(cal, compute=p["compute"], gemm_half_flops=p["gemm_half_flops"], nvlink=p["nvlink"],
                   nvlink_latency_s=p["nvlink_latency_s"], network_latency_s=p["network_latency_s"],
                   network=p["network"])


def _mape(errors: Sequence[float | None]) -> float | None:
    values = [abs(e) for e in errors if e is not None]
    return sum(values) / len(values) if values else None


def fit_calibration(samples: Sequence[Sample], gpu_type: str, *, eff: C.Efficiency = C.EFFICIENCY,
                    overheads: C.Overheads = C.OVERHEADS, start: Calibration | None = None) -> CalibrationResult:
    """Refit this cluster type's constants to its runs (PredictorError when none can be used)."""
    problems = [Problem("run", s.name, f"was measured on gpu_type={s.inputs.hw.gpu}, not {gpu_type}")
                for s in samples if s.inputs.hw.gpu != gpu_type]
    timed = [s for s in samples if s.step_time_s and not s.held_out]
    if not timed:
        problems.append(Problem("runs", len(samples), "no finished run with step times to fit (they need "
                                "`step=... step_time_s=...` lines in their logs); run a few short ones first "
                                "(python -m launcher sweep ...)"))
    if problems:
        raise PredictorError(problems)
    first = start or start_values(gpu_type, eff, overheads)
    active = _active(timed)
    bounds = {name: (CPU_COMPUTE_BOUNDS if name == "compute" and gpu_type == "cpu" else BOUNDS[name])
              for name in active}
    start_params = {name: getattr(first, name) for name in PARAMETERS}
    # start inside the bounds (a value outside them cannot be reached from within)
    start_params = {k: min(max(v, bounds[k][0]), bounds[k][1]) if k in bounds else v for k, v in start_params.items()}

    def loss(params: Mapping[str, float]) -> float:
        cal = _with_params(first, params)
        total = 0.0
        for s in timed:
            predicted, _ = _predict(s, cal, eff, overheads)
            total += math.log(predicted / (s.step_time_s or 1.0)) ** 2
        pull = sum(math.log(params[k] / start_params[k]) ** 2 for k in bounds)
        return total / len(timed) + RIDGE * pull

    params = minimise(loss, start_params, bounds)
    fitted = list(active)
    cal = _with_params(first, params)

    host = [s.peak_allocated_bytes - (_predict(s, cal, eff, overheads)[1] - cal.host_process_bytes)
            for s in samples if not s.held_out and s.memory_kind == "cpu_max_rss" and s.peak_allocated_bytes]
    if host:
        cal = replace(cal, host_process_bytes=int(statistics.median(host)))
        fitted.append("host_process_bytes")
    margins = [s.peak_reserved_bytes / s.peak_allocated_bytes - 1 for s in samples
               if not s.held_out and s.memory_kind == "cuda" and s.peak_allocated_bytes and s.peak_reserved_bytes]
    if margins:
        cal = replace(cal, allocator_margin_fraction=max(0.0, statistics.median(margins)))
        fitted.append("allocator_margin_fraction")

    rows = []
    for s in samples:
        before_step, before_mem = _predict(s, first, eff, overheads)
        after_step, after_mem = _predict(s, cal, eff, overheads)
        cpu = s.memory_kind == "cpu_max_rss"
        measured_mem = s.peak_allocated_bytes if cpu else s.peak_reserved_bytes
        rows.append(SampleResult(name=s.name, held_out=s.held_out, layout=layout_label(s.inputs),
                                 measured_step_s=s.step_time_s, before_step_s=before_step, after_step_s=after_step,
                                 memory_compared="predicted total vs max RSS" if cpu
                                 else "predicted reserved vs max_memory_reserved",
                                 measured_memory=measured_mem, before_memory=before_mem, after_memory=after_mem))
    error = {
        "fitted_before": _mape([r.before_error for r in rows if not r.held_out]),
        "fitted_after": _mape([r.after_error for r in rows if not r.held_out]),
        "held_out_before": _mape([r.before_error for r in rows if r.held_out]),
        "held_out_after": _mape([r.after_error for r in rows if r.held_out]),
    }
    cal = replace(cal, fitted=tuple(fitted), runs=tuple(s.name for s in samples if not s.held_out),
                  held_out=tuple(s.name for s in samples if s.held_out), step_time_error=error)
    return CalibrationResult(calibration=cal, start=first, samples=tuple(rows))


# --------------------------------------------------------------------------- the file


def calibration_yaml(cal: Calibration, header: str = "") -> str:
    import yaml

    lines = ["# Cluster calibration: python -m memory_predictor calibrate (docs/memory_predictor.md, \"Calibration",
             "# from your runs\"). Use it with --calibration FILE or cluster.calibration=FILE."]
    if header:
        lines += [f"# {line}" for line in header.splitlines()]
    return "\n".join(lines) + "\n" + yaml.safe_dump(cal.as_dict(), sort_keys=False)


def calibration_from_dict(data: Any, source: str) -> Calibration:
    """Checked: every field named with its value and the fix (PredictorError)."""
    if not isinstance(data, dict) or not isinstance(data.get("efficiency"), dict) \
            or not isinstance(data.get("overheads"), dict):
        raise PredictorError([Problem("calibration", source, "is not a calibration file (expected the mappings "
                                      "efficiency and overheads); write one with python -m memory_predictor calibrate")])
    problems: list[Problem] = []
    if data.get("version") != VERSION:
        problems.append(Problem("calibration.version", data.get("version"), f"this predictor reads version {VERSION}; "
                                "recalibrate with this version"))
    values: dict[str, Any] = {}
    for section, names in (("efficiency", PARAMETERS), ("overheads", ("allocator_margin_fraction", "host_process_bytes"))):
        for name in names:
            value = data[section].get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (value == 0 and name != "allocator_margin_fraction"):
                problems.append(Problem(f"calibration.{section}.{name}", value, "must be a positive number"))
            values[name] = value
    for name in ("compute", "network", "nvlink"):
        if isinstance(values.get(name), (int, float)) and values[name] > 1 and not (name == "compute"
                                                                                    and data.get("gpu_type") == "cpu"):
            problems.append(Problem(f"calibration.efficiency.{name}", values[name], "must be at most 1 (a fraction)"))
    if not isinstance(data.get("gpu_type"), str):
        problems.append(Problem("calibration.gpu_type", data.get("gpu_type"), "must name the cluster's GPU type"))
    if problems:
        raise PredictorError(problems)
    return Calibration(gpu_type=data["gpu_type"], host_process_bytes=int(values.pop("host_process_bytes")),
                       fitted=tuple(data.get("fitted") or ()), runs=tuple(data.get("runs") or ()),
                       held_out=tuple(data.get("held_out") or ()), step_time_error=data.get("step_time_error"),
                       **{k: float(v) for k, v in values.items()})


def read_calibration(path: str) -> Calibration:
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise PredictorError([Problem("calibration", path, f"cannot be read ({exc.strerror or exc}); give the file "
                                      "python -m memory_predictor calibrate wrote")]) from None
    except yaml.YAMLError:
        raise PredictorError([Problem("calibration", path, "is not valid YAML; recreate it with "
                                      "python -m memory_predictor calibrate")]) from None
    return calibration_from_dict(data, path)


__all__ = ["Calibration", "Sample", "SampleResult", "CalibrationResult", "start_values", "fit_calibration",
           "calibration_yaml", "calibration_from_dict", "read_calibration"]
