"""The monitoring callback for the training loop (see trainer.callbacks).

Turns the loop's events into sink events: the console (rank 0 alerts, per-rank health), the
Prometheus exporter of this rank, W&B (rank 0) and the straggler detector. Alerts go through
one rate limiter before any sink sees them. Training never waits on a sink, except for one tiny
all-gather per straggler interval and, when a rank fails, a bounded wait for rank 0 to report it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from configs.schema import RootConfig
from monitoring.alerts import FailureBoard, RateLimiter, describe_error, log_tail, redact
from monitoring.events import (Alert, CheckpointEvent, Level, Outcome, RankIdentity, RunInfo, StepSample,
                               ValidationSample)
from monitoring.node_exporter import STARTED_ENV
from monitoring.prometheus_sink import PrometheusSink
from monitoring.sinks import ConsoleSink, FanOut, MetricSink
from monitoring.straggler_sink import Gather, StragglerSink
from monitoring.wandb_sink import WandbSink, failure_alert

if TYPE_CHECKING:  # the loop's types; importing them at run time would pull in megatron
    from trainer.callbacks import StepReport, TrainingCallback, TrainState
    from trainer.distributed import Layout

RUN_DIR_ENV = "HYPERLAUNCH_RUN_DIR"
_ACTIVE: Optional["MonitoringCallback"] = None


def make_callback(cfg: RootConfig, layout: Layout) -> TrainingCallback | None:
    """None while no monitoring sink (Prometheus, W&B, straggler detection) is enabled."""
    if not cfg.monitoring.any_sink:
        return None
    return MonitoringCallback(cfg, layout)


def active() -> Optional["MonitoringCallback"]:
    return _ACTIVE


def rank_identity(layout: Layout) -> RankIdentity:
    """Host and GPU of this rank, as DCGM names them (physical index, ``GPU-<uuid>``)."""
    gpu, uuid, name = str(layout.local_rank), "", "cpu"
    if not layout.gloo:
        import torch

        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        uuid = f"GPU-{props.uuid}" if getattr(props, "uuid", None) else ""
        name = props.name
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        gpu = visible[index] if index < len(visible) and visible[index].isdigit() else str(index)
    return RankIdentity(rank=layout.rank, local_rank=layout.local_rank, host=socket.gethostname(), gpu=gpu,
                        gpu_uuid=uuid, gpu_name=name, pp_rank=layout.pp_rank, tp_rank=layout.tp_rank,
                        dp_rank=layout.dp_rank)


def torch_gather(layout: Layout) -> Gather:
    """All-gather one row of floats per rank over the training process group."""
    import torch
    import torch.distributed as dist

    device = torch.device("cpu") if layout.gloo else torch.device("cuda", torch.cuda.current_device())

    def gather(row: list[float]) -> list[list[float]]:
        mine = torch.tensor(row, dtype=torch.float64, device=device)
        rows = [torch.empty_like(mine) for _ in range(layout.world_size)]
        dist.all_gather(rows, mine)
        return torch.stack(rows).cpu().tolist()

    return gather


class MonitoringCallback:
    def __init__(self, cfg: RootConfig, layout: Layout, gather: Optional[Gather] = None):
        self.cfg = cfg
        self.m = cfg.monitoring
        self.layout = layout
        self.identity = rank_identity(layout)
        self.run_dir = os.environ.get(RUN_DIR_ENV) or None
        self.board = FailureBoard(self.run_dir) if self.run_dir else None
        self.limiter = RateLimiter(self.m.alerts)
        self._alert_lock = threading.Lock()
        self.run: Optional[RunInfo] = None
        secrets = tuple(cfg.cluster.secret_env)
        self.secret_names = secrets
        sinks: list[MetricSink] = [ConsoleSink(layout.rank)]
        self.prometheus: Optional[PrometheusSink] = None
        if self.m.prometheus:
            advertise = "127.0.0.1" if cfg.cluster.kind == "local" else socket.gethostname()
            self.prometheus = PrometheusSink(self.m, self.identity, advertise, self._degraded)
            sinks.append(self.prometheus)
        self.wandb: Optional[WandbSink] = None
        if self.m.wandb and layout.rank == 0:
            self.wandb = WandbSink(self.m, _wandb_config(cfg, layout), cfg.training.log_interval, self._degraded,
                                   secrets, self.board)
            sinks.append(self.wandb)
        self.sinks = FanOut(sinks)
        self.straggler: Optional[StragglerSink] = None
        if self.m.straggler.enabled:
            gather = gather or (torch_gather(layout) if layout.world_size > 1 else None)
            self.straggler = StragglerSink(self.m.straggler, layout.rank, layout.pp_rank, layout.world_size, gather,
                                           self.sinks, self.alert)
        self._node_exporter: Optional[subprocess.Popen[bytes]] = None
        self._started = time.time()
        self._overhead_s = 0.0  # time on_step_end took on this rank (the in-loop part of monitoring)
        self._step_s = 0.0

    # -- events from the loop ------------------------------------------------------------------

    def on_train_start(self, state: TrainState) -> None:
        global _ACTIVE
        layout = self.layout
        identities = {layout.rank: self.identity}
        if self.straggler is not None and layout.world_size > 1:
            import torch.distributed as dist

            everyone: list[Any] = [None] * layout.world_size
            dist.all_gather_object(everyone, self.identity)
            identities = {ident.rank: ident for ident in everyone}
        run = Path(self.run_dir).name if self.run_dir else self.cfg.run_name
        self.run = RunInfo(run=run, run_name=self.cfg.run_name, world_size=layout.world_size,
                           total_steps=state.total_steps, slurm_job=os.environ.get("SLURM_JOB_ID", ""),
                           run_dir=self.run_dir, identity=self.identity)
        if layout.rank == 0 and self.board is not None:
            self.board.clear()
        self._start_node_exporter()
        self.sinks.start(self.run)
        if self.straggler is not None:
            self.straggler.identities = identities
            self.straggler.run = run
        _ACTIVE = self
        if layout.rank == 0:
            c = self.cfg.cluster
            restart = os.environ.get("SLURM_RESTART_COUNT", "0")
            where = f"Slurm job {self.run.slurm_job} (restart {restart})" if self.run.slurm_job else "local"
            self.alert(Alert("Job started", f"run {run}: {layout.world_size} ranks on {c.nodes} node(s) "
                             f"({c.gpu_type}), steps {state.step + 1}-{state.total_steps}, {where}",
                             Level.INFO, terminal=True))
            if self.run_dir:  # what the preflight of this job did before this attempt (a quarantine, a failure)
                from monitoring.preflight_events import pending_alerts

                for alert in pending_alerts(self.run_dir):
                    self.alert(alert)

    def on_step_end(self, state: TrainState, report: StepReport) -> None:
        started = time.perf_counter()
        t = self.cfg.training
        sample = StepSample(step=report.step, total_steps=report.total_steps, loss=report.loss,
                            grad_norm=report.grad_norm, lr=report.lr, step_time_s=report.step_time_s,
                            tokens_per_s=report.tokens_per_s, tokens=t.global_batch_size * t.seq_length,
                            tflops_per_gpu=report.tflops_per_gpu, mfu_percent=report.mfu_percent,
                            compute_s=report.compute_s, data_wait_s=report.data_wait_s)
        self.sinks.step(sample)
        if report.run is not None:  # rank 0: progress, the goodput ledger, plan vs actual
            self.sinks.progress(report.run)
        for notice in report.notices:  # milestones, restarts (and what they cost), plan drift
            self.alert(Alert(notice.title, notice.text, Level(notice.level)))
        if self.straggler is not None:
            self.straggler.step(sample)
        spent = time.perf_counter() - started
        self._overhead_s += spent
        self._step_s += report.step_time_s
        if self.prometheus is not None:
            self.prometheus.add_overhead(spent)

    def after_shutdown(self, state: TrainState, *, finished: bool) -> None:
        pass

    def on_validation(self, state: TrainState, report: Any) -> None:
        self.sinks.validation(ValidationSample(step=report.step, loss=report.loss, perplexity=report.perplexity,
                                               per_source=dict(report.per_source)))

    def on_train_end(self, state: TrainState, *, finished: bool, error: Optional[BaseException] = None) -> None:
        global _ACTIVE
        run = self.run.run if self.run else self.cfg.run_name
        if error is not None:
            outcome = self._failed(state, error, run)
        else:
            outcome = Outcome("finished" if finished else "stopped", state.step)
            if self.layout.rank == 0:
                elapsed = time.time() - self._started
                if finished:
                    self.alert(Alert("Job finished", f"run {run}: {state.step} steps in {elapsed / 60:.1f} min",
                                     Level.INFO, terminal=True))
                else:
                    self.alert(Alert("Job stopped", f"run {run}: stopped after step {state.step} on request; "
                                     "a requeued job resumes from the latest checkpoint", Level.INFO, terminal=True))
        self.sinks.finish(outcome)
        self._stop_node_exporter()
        if self.layout.rank == 0 and self._step_s > 0:
            share = 100 * self._overhead_s / self._step_s
            line = f"monitoring: in-loop overhead {self._overhead_s * 1e3:.1f} ms = {share:.3f}% of {self._step_s:.1f} s"
            if self.wandb is not None:  # its own thread: competes for the GIL, not inside the loop
                cpu = self.wandb.thread_cpu_s
                line += (f"; W&B thread CPU {cpu * 1e3:.1f} ms = {100 * cpu / self._step_s:.3f}% (+ "
                         f"{self.wandb.init_cpu_s:.2f} s once for wandb.init)")
            print(line + " of steps on rank 0", flush=True)
        _ACTIVE = None

    def _failed(self, state: TrainState, error: BaseException, run: str) -> Outcome:
        reason, tb = describe_error(error)
        details = redact(f"--- traceback (last lines)\n{tb}\n{log_tail(self.run_dir, self.m.alerts.log_tail_lines)}",
                         self.secret_names).strip()
        reason = redact(reason, self.secret_names)
        record = {"who": self.identity.describe(), "step": state.step, "reason": reason, "details": details}
        if self.board is not None:
            try:
                self.board.post(self.layout.rank, record)
            except OSError:
                pass
        rank = self.layout.rank
        if rank == 0:
            earlier = [r for r in (self.board.records() if self.board else []) if r.get("rank") != 0]
            root = earlier[0] if earlier else {"rank": 0, **record}
            if earlier:  # another rank failed first: this rank's error is the consequence
                root = {**root, "details": f"{root.get('details', '')}\n(rank 0 then failed with: {reason})"}
            self.alert(failure_alert(root, run))
        elif self.m.wandb and self.board is not None and self.board.listening():
            self.board.wait_ack(rank, self.m.alerts.failure_ack_timeout_s)
        return Outcome("failed", state.step, reason=reason, failed_rank=rank, details=details)

    # -- API for other parts of the process ----------------------------------------------------

    def alert(self, alert: Alert) -> None:
        """The one way into the sinks: redacted (console and log tails included), then rate-limited."""
        alert = Alert(alert.title, redact(alert.text, self.secret_names), alert.level, alert.terminal)
        with self._alert_lock:
            admitted = self.limiter.admit(alert)
        if admitted is not None:
            self.sinks.alert(admitted)

    def record_checkpoint(self, event: CheckpointEvent) -> None:
        self.sinks.checkpoint(event)
        if not event.ok and self.layout.rank == 0:
            what = "replication" if event.operation.value == "replication" else "save"
            self.alert(Alert(f"Checkpoint {what} failing",
                             f"run {self.run.run if self.run else ''}, step {event.step}: checkpoint "
                             f"{event.operation.value} failed after {event.seconds:.1f} s on "
                             f"{self.identity.describe()}: {redact(event.error or 'no reason given', self.secret_names)}",
                             Level.ERROR if what == "save" else Level.WARN))

    def _degraded(self, component: str, message: str) -> None:
        self.sinks.degraded(component, message)

    # -- the node exporter of local runs -------------------------------------------------------

    def _start_node_exporter(self) -> None:
        """Slurm's step script starts one per node; a local run gets one from local rank 0."""
        if not (self.m.prometheus and self.m.node_exporter != "off" and self.layout.local_rank == 0
                and self.run_dir and not os.environ.get(STARTED_ENV)):
            return
        self._node_exporter = subprocess.Popen(
            [sys.executable, "-m", "monitoring.node_exporter", "--run-dir", self.run_dir,
             "--parent-pid", str(os.getpid())], env={**os.environ, STARTED_ENV: "1"})

    def _stop_node_exporter(self) -> None:
        proc, self._node_exporter = self._node_exporter, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wandb_config(cfg: RootConfig, layout: Layout) -> dict[str, Any]:
    """What a W&B run shows as its config: the model, layout and training hyper-parameters."""
    from dataclasses import asdict

    return {"model": asdict(cfg.model), "training": asdict(cfg.training), "parallelism": asdict(cfg.parallelism),
            "cluster": {"name": cfg.cluster.name, "nodes": cfg.cluster.nodes, "gpus_per_node": cfg.cluster.gpus_per_node,
                        "gpu_type": cfg.cluster.gpu_type, "instance_type": cfg.cluster.instance_type},
            "world_size": layout.world_size, "dp_size": layout.dp_size}
