"""Finished runs as the predictor sees them: what was predicted, with which inputs, and what was measured.

A run directory (written by ``python -m launcher``) holds ``prediction.json`` (the prediction
of the layout it runs; since calibration, also its ``inputs``: model, batch, layout, options
and hardware as the predictor's dataclasses), ``config.yaml``, ``kernels.json``, ``job.json`` and
``logs/``. Rank 0 prints one line per step and a final memory line::

    step=3/30 loss=5.8486 ... step_time_s=0.070 tokens_per_s=7300.0 tflops_per_gpu=0.011 mfu=n/a
    memory: kind=cuda max_peak_allocated_bytes=... max_peak_reserved_bytes=...

(Slurm logs carry ``srun --label`` prefixes, ``0: ``; a requeued run has one log per job.)
Fields are read by name, so a line with more fields still parses. This module reads files; the
fit (memory_predictor.calibration) and the page (memory_predictor.report) stay pure.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from memory_predictor.errors import PredictorError, Problem
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec

PREDICTION_FILE = "prediction.json"
_STEP = re.compile(r"^step=(\d+)/(\d+)\s")
_FIELD = re.compile(r"(\w+)=(\S+)")
_MEMORY = re.compile(r"^memory: kind=(\S+) max_peak_allocated_bytes=(\d+) max_peak_reserved_bytes=(\d+)")
_TASK_LABEL = re.compile(r"^\d+: ")  # srun --label prefixes each line with the task id


@dataclass(frozen=True, slots=True)
class Measured:
    """What a run's logs say: medians after the warm-up steps, and the peak-memory line."""

    steps_logged: int
    step_time_s: float | None
    tokens_per_s: float | None
    tflops_per_gpu: float | None
    memory_kind: str | None  # cuda | cpu_max_rss
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    step_times: tuple[float, ...]  # every logged step, in order

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def parse_log(lines: Iterable[str], skip: int = 2) -> Measured:
    """Medians of step time, tokens/s and TFLOP/s over the steps after ``skip`` (all if none are left)."""
    steps: list[tuple[int, float, float | None, float | None]] = []
    memory: tuple[str, int, int] | None = None
    for raw in lines:
        line = _TASK_LABEL.sub("", raw.strip())
        match = _STEP.match(line)
        if match:
            values = dict(_FIELD.findall(line))
            step_time = _number(values.get("step_time_s"))
            if step_time is not None:
                steps.append((int(match.group(1)), step_time, _number(values.get("tokens_per_s")),
                              _number(values.get("tflops_per_gpu"))))
            continue
        mem = _MEMORY.match(line)
        if mem:  # a requeued run prints one per job: keep the largest
            found = (mem.group(1), int(mem.group(2)), int(mem.group(3)))
            memory = found if memory is None or found[1] > memory[1] else memory
    kept = [s for s in steps if s[0] > skip] or steps

    def median(index: int) -> float | None:
        values = [s[index] for s in kept if s[index] is not None]
        return statistics.median(values) if values else None  # type: ignore[type-var]

    return Measured(steps_logged=len(steps), step_time_s=median(1), tokens_per_s=median(2), tflops_per_gpu=median(3),
                    memory_kind=memory[0] if memory else None, peak_allocated_bytes=memory[1] if memory else None,
                    peak_reserved_bytes=memory[2] if memory else None, step_times=tuple(s[1] for s in steps))


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def log_paths(run_dir: Path) -> list[Path]:
    """Rank 0's stdout: ``logs/local.out``, or the Slurm job's ``logs/*_<job id>.out`` (every ``*.out``
    when the job id is unknown)."""
    record = _json(run_dir / "job.json") or {}
    logs = run_dir / "logs"
    if record.get("backend") == "local":
        return [logs / "local.out"]
    job_id = record.get("job_id")
    found = sorted(logs.glob(f"*_{job_id}.out")) if job_id else []
    return found or sorted(logs.glob("*.out"))


def measure_run(run_dir: Path, skip: int = 2) -> Measured:
    lines: list[str] = []
    for path in log_paths(run_dir):
        try:
            lines += path.read_text(errors="replace").splitlines()
        except OSError:
            continue
    return parse_log(lines, skip)


# --------------------------------------------------------------------------- the predictor's inputs


@dataclass(frozen=True, slots=True)
class RunInputs:
    model: ModelSpec
    train: TrainSpec
    layout: Layout
    opts: Options
    hw: Hardware

    @property
    def cpu(self) -> bool:
        return self.hw.gpu == "cpu"


def inputs_json(model: ModelSpec, train: TrainSpec, layout: Layout, opts: Options, hw: Hardware) -> dict[str, Any]:
    """The predictor's inputs, as ``prediction.json`` records them (``inputs_from_json`` reads them back)."""
    return {"model": asdict(model), "train": asdict(train), "layout": asdict(layout), "options": asdict(opts),
            "hardware": asdict(hw)}


def _build(cls: Any, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def inputs_from_json(data: Mapping[str, Any]) -> RunInputs:
    return RunInputs(model=_build(ModelSpec, data["model"]), train=_build(TrainSpec, data["train"]),
                     layout=_build(Layout, data["layout"]), opts=_build(Options, data["options"]),
                     hw=_build(Hardware, data["hardware"]))


def inputs_from_run_files(prediction: Mapping[str, Any], config: Mapping[str, Any],
                          kernels: Mapping[str, Any] | None) -> RunInputs:
    """For run directories written before ``prediction.json`` recorded its inputs: the layout and
    hardware from the prediction, the model and numerics from ``config.yaml``, the kernels from
    ``kernels.json``."""
    m, par, training = config["model"], config.get("parallelism") or {}, config.get("training") or {}
    model = ModelSpec(name=str(m["name"]), num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                      ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
                      num_query_groups=m["num_query_groups"], vocab_size=m["vocab_size"],
                      make_vocab_size_divisible_by=m.get("make_vocab_size_divisible_by", 128),
                      tie_embeddings=bool(m.get("tie_embeddings")), qkv_bias=bool(m.get("qkv_bias")),
                      kv_channels=m.get("head_dim"))
    lay, hw = prediction["layout"], prediction["hardware"]
    layout = Layout(tp=lay["tp"], pp=lay["pp"], vpp=lay.get("vpp", 1), cp=lay["cp"], dp=lay["dp"],
                    sequence_parallel=bool(lay.get("sequence_parallel", True)), recompute=lay.get("recompute", "none"),
                    recompute_num_layers=par.get("recompute_num_layers", 1),
                    distributed_optimizer=bool(lay.get("distributed_optimizer", True)))
    train = TrainSpec(seq_length=prediction["seq_length"], micro_batch_size=lay["mbs"],
                      global_batch_size=prediction["global_batch_size"])
    gpu = hw["gpu"]
    kernels = kernels or {"transformer_engine": gpu != "cpu", "flash_attention": gpu != "cpu",
                          "fused_swiglu": gpu != "cpu", "gradient_accumulation_fusion": gpu != "cpu"}
    opts = Options.from_kernels(kernels, precision=training.get("precision", "bf16"),
                                overlap_grad_reduce=par.get("overlap_grad_reduce", True),
                                overlap_param_gather=par.get("overlap_param_gather", True),
                                tp_comm_overlap=par.get("tp_comm_overlap", False),
                                usable_fraction=prediction.get("usable_fraction", par.get("usable_memory_fraction", 0.94)))
    from memory_predictor.spec import hardware

    base = hardware(gpu, nodes=hw["nodes"], gpus_per_node=hw["gpus_per_node"])
    memory = int(hw.get("memory_bytes") or 0)
    full = Hardware(gpu=gpu, memory_bytes=memory, peak_tflops=float(hw.get("peak_tflops") or base.peak_tflops),
                    hbm_bytes_per_s=base.hbm_bytes_per_s, nvlink_bytes_per_s=base.nvlink_bytes_per_s,
                    network_bytes_per_s_per_node=base.network_bytes_per_s_per_node, nodes=hw["nodes"],
                    gpus_per_node=hw["gpus_per_node"], note=str(hw.get("note", base.note)),
                    check_memory=memory > 0)
    return RunInputs(model=model, train=train, layout=layout, opts=opts, hw=full)


# --------------------------------------------------------------------------- run directories


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_dir: str
    name: str
    state: str | None
    prediction: dict[str, Any]
    inputs: RunInputs
    measured: Measured


def read_run(run_dir: Path, skip: int = 2) -> RunRecord:
    """One run directory; PredictorError naming what is missing when it cannot be used."""
    prediction = _json(run_dir / PREDICTION_FILE)
    if prediction is None:
        raise PredictorError([Problem("run", str(run_dir), f"has no readable {PREDICTION_FILE} (was it launched by "
                                      "`python -m launcher`?)")])
    try:
        if isinstance(prediction.get("inputs"), dict):
            inputs = inputs_from_json(prediction["inputs"])
        else:
            import yaml

            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            inputs = inputs_from_run_files(prediction, config, _json(run_dir / "kernels.json"))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise PredictorError([Problem("run", str(run_dir), f"cannot rebuild the prediction's inputs ({exc!r}); "
                                      "relaunch it with this version of the launcher")]) from None
    state = (_json(run_dir / "job.json") or {}).get("state")
    return RunRecord(run_dir=str(run_dir), name=run_dir.name, state=state, prediction=prediction, inputs=inputs,
                     measured=measure_run(run_dir, skip))


def find_run_dirs(root: Path, depth: int = 3) -> list[Path]:
    """Run directories (holding ``prediction.json``) at or below ``root`` (a run, a runs root, a sweep)."""
    if (root / PREDICTION_FILE).is_file():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    out: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            out += find_run_dirs(child, depth - 1)
    return out


__all__ = ["Measured", "parse_log", "log_paths", "measure_run", "RunInputs", "inputs_json", "inputs_from_json",
           "inputs_from_run_files", "RunRecord", "read_run", "find_run_dirs", "PREDICTION_FILE"]
