"""The W&B sink (rank 0 only): metrics and alerts from one background thread.

Nothing here blocks training: events go into a bounded queue and a worker thread initializes
the run, logs and alerts. W&B forwards alerts to Slack or e-mail (user/team settings); offline
runs keep them in the ``.wandb`` file until ``wandb sync``. The worker also watches the failure
board, because a rank that fails elsewhere makes torchrun stop rank 0 moments later: it sends
the "Job failed" alert, finishes the run, then acknowledges so the failing rank may exit.

Every row carries its training step as ``train/step``, the x axis of every metric
(``define_metric``); rows are logged without ``step=``. A requeued job resumes the same W&B run
and logs steps the run has seen before (the ones after its last checkpoint): with ``step=`` W&B
drops every row below its last ``_step`` ("Tried to log to step ... that is less than the current
step"), or renumbers them on ``wandb sync``; with a custom step metric ``_step`` is only a row
counter and each metric is charted at its training step.
"""

from __future__ import annotations

import netrc
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from monitoring.alerts import FailureBoard, clip, redact
from configs.monitoring_config import MonitoringConfig
from monitoring.events import (Alert, CheckpointEvent, Level, Outcome, ProgressSample, RunInfo, StepSample,
                               StragglerReport, ThroughputReport, ValidationSample)
from monitoring.sinks import MetricSink

Report = Callable[[str, str], None]
STEP_METRIC = "train/step"
_ID = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class _Log:
    step: int
    data: dict[str, float]


@dataclass(frozen=True)
class _Summary:
    data: dict[str, Any]


@dataclass(frozen=True)
class _Finish:
    outcome: Outcome


def credentials_problem(cfg: MonitoringConfig) -> Optional[str]:
    """Why an online W&B run cannot start, or None. Checked before any network call."""
    if cfg.wandb_mode == "offline" or os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"W&B has no credentials (WANDB_API_KEY is unset and ~/.netrc has no {host} entry): W&B metrics and "
            "alerts are off for this run. Forward WANDB_API_KEY (cluster.secret_env) or set "
            "monitoring.wandb_mode=offline; Prometheus rules still cover the alerts")


class WandbSink(MetricSink):
    name = "wandb"

    def __init__(self, cfg: MonitoringConfig, run_config: dict[str, Any], log_interval: int, report: Report,
                 secret_names: tuple[str, ...] = (), board: Optional[FailureBoard] = None):
        self.cfg = cfg
        self.run_config = run_config
        self.log_interval = max(1, log_interval)
        self.report = report
        self.secret_names = secret_names
        self.board = board
        self._queue: queue.Queue[object] = queue.Queue(maxsize=10000)
        self._thread: Optional[threading.Thread] = None
        self._info: Optional[RunInfo] = None
        self._run: Any = None
        self._failed_sent = False
        self._finished = False
        self.dropped = 0
        self._latest_summary: dict[str, Any] = {}  # the newest progress, written into the summary at the end
        self.thread_cpu_s = 0.0  # CPU time of the worker thread after wandb.init (set when it ends)
        self.init_cpu_s = 0.0  # ...and of wandb.init (once per run, before the first step is logged)

    # -- events (training thread) ---------------------------------------------------------------

    def start(self, run: RunInfo) -> None:
        self._info = run
        problem = credentials_problem(self.cfg)
        if problem:
            self.report("wandb", problem)
            return
        self._thread = threading.Thread(target=self._work, name="wandb-sink", daemon=True)
        self._thread.start()

    def step(self, s: StepSample) -> None:
        if s.step % self.log_interval and s.step != s.total_steps:
            return
        data = {"train/loss": s.loss, "train/lr": s.lr, "train/step_time_s": s.step_time_s,
                "train/tokens_per_s": s.tokens_per_s, "train/tflops_per_gpu": s.tflops_per_gpu,
                "train/compute_s_rank0": s.compute_s, "train/data_wait_s_rank0": s.data_wait_s}
        if s.grad_norm is not None:
            data["train/grad_norm"] = s.grad_norm
        if s.mfu_percent is not None:
            data["train/mfu"] = s.mfu_percent / 100.0
        self._put(_Log(s.step, data))

    def progress(self, p: ProgressSample) -> None:
        """Progress and goodput as metrics (at the log interval), the run's standing in the summary."""
        summary: dict[str, Any] = {"progress/fraction": p.fraction, "progress/tokens": p.tokens_done,
                                   "goodput/ratio": p.goodput, "goodput/attempts": p.attempts,
                                   "goodput/redone_steps": p.redone_steps, "goodput/tokens_per_gpu_hour":
                                   p.tokens_per_gpu_hour, **{f"goodput/{k}_s": v for k, v in p.seconds.items()}}
        for key, value in (("progress/eta_s", p.eta_s), ("progress/milestone", p.milestone),
                           ("goodput/cost_usd", p.cost_usd), ("goodput/projected_cost_usd", p.projected_cost_usd),
                           ("goodput/last_restart_lost_s", p.last_restart_lost_s),
                           ("plan/step_time_ratio", p.plan_step_time_ratio), ("plan/memory_ratio", p.plan_memory_ratio)):
            if value is not None:
                summary[key] = value
        summary["progress/elapsed_s"] = p.elapsed_s
        if p.step % self.log_interval == 0 or p.fraction >= 1.0:
            self._put(_Log(p.step, {k: float(v) for k, v in summary.items()}))
        self._latest_summary = summary

    def validation(self, v: ValidationSample) -> None:
        data = {"val/loss": v.loss, "val/perplexity": v.perplexity}
        data.update({f"val/loss/{name}": loss for name, loss in v.per_source.items()})
        self._put(_Log(v.step, data))

    def stragglers(self, report: StragglerReport) -> None:
        if not report.scores:
            return
        worst = min(report.scores, key=lambda sc: sc.score)
        self._put(_Log(report.step, {"straggler/min_score": worst.score, "straggler/slowest_rank": float(worst.rank),
                                     "straggler/flagged": float(len(report.flagged))}))

    def throughput(self, report: ThroughputReport) -> None:
        self._put(_Log(report.step, {"throughput/window_tokens_per_s": report.tokens_per_s,
                                     "throughput/baseline_tokens_per_s": report.baseline,
                                     "throughput/drop": float(report.dropped)}))

    def checkpoint(self, event: CheckpointEvent) -> None:
        key = f"checkpoint/{event.operation.value}"
        data = {f"{key}_ok": float(event.ok)}
        if event.ok:
            data[f"{key}_s"] = event.seconds
        self._put(_Log(event.step, data))

    def alert(self, alert: Alert) -> None:
        self._put(alert, block=True)

    def finish(self, outcome: Outcome) -> None:
        if self._thread is None:
            return
        if self._latest_summary:
            self._put(_Summary(dict(self._latest_summary)), block=True)
        self._put(_Finish(outcome), block=True)
        self._thread.join(timeout=60)

    def _put(self, item: object, block: bool = False) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(item, block=block, timeout=5 if block else None)
        except queue.Full:
            self.dropped += 1

    # -- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        started = time.thread_time()
        try:
            self._work_items(started)
        finally:  # what this thread cost the process while training ran (start-up not included)
            self.thread_cpu_s = time.thread_time() - started - self.init_cpu_s

    def _work_items(self, started: float) -> None:
        try:
            self._init()
        except Exception as exc:
            self.report("wandb", f"W&B could not start ({type(exc).__name__}: {redact(str(exc), self.secret_names)}); "
                        "W&B metrics and alerts are off for this run, training continues")
            self._run = None
        self.init_cpu_s = time.thread_time() - started  # wandb.init, once per run
        if self.board is not None:
            self.board.listen()
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            self._watch_failures()
            if item is None:
                continue
            if isinstance(item, _Finish):
                self._finish(item.outcome)
                return
            if self._run is None or self._finished:
                continue
            try:
                if isinstance(item, _Log):
                    self._run.log({**item.data, STEP_METRIC: item.step})
                elif isinstance(item, _Summary):
                    self._run.summary.update(item.data)
                elif isinstance(item, Alert):
                    self._alert(item)
            except Exception as exc:  # keep the worker alive
                self.report("wandb", f"W&B call failed ({type(exc).__name__}: {redact(str(exc), self.secret_names)}); "
                            "continuing")

    def _init(self) -> None:
        import wandb

        info = self._info
        if info is None:
            raise RuntimeError("the W&B sink was not started")
        run_dir = info.run_dir or os.getcwd()
        wandb_dir = self.cfg.wandb_dir or run_dir
        os.makedirs(wandb_dir, exist_ok=True)
        self._run = wandb.init(
            project=self.cfg.wandb_project or info.run_name, entity=self.cfg.wandb_entity, name=info.run_name,
            id=_ID.sub("-", info.run)[:64], resume="allow", dir=wandb_dir,
            mode="offline" if self.cfg.wandb_mode == "offline" else "online",
            config=self.run_config, job_type="train",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, init_timeout=90))
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)

    def _alert(self, alert: Alert) -> None:
        import wandb

        if alert.title == "Job failed":
            if self._failed_sent:
                return
            self._failed_sent = True
        levels = wandb.AlertLevel  # type: ignore[attr-defined]  # exported lazily by wandb
        level = {Level.INFO: levels.INFO, Level.WARN: levels.WARN, Level.ERROR: levels.ERROR}[alert.level]
        self._run.alert(title=alert.title, text=clip(redact(alert.text, self.secret_names)), level=level,
                        wait_duration=max(1, int(self.cfg.alerts.min_interval_s)))

    def _finish(self, outcome: Outcome) -> None:
        if self._run is not None and not self._finished:
            self._run.summary.update({"outcome": outcome.state, "final_step": outcome.step})
            self._run.finish(exit_code=1 if outcome.state == "failed" else 0)
        self._finished = True
        if self.board is not None:
            self.board.unlisten()
            self._watch_failures()

    def _watch_failures(self) -> None:
        """Report another rank's failure before torchrun stops this process, then let it exit."""
        if self.board is None:
            return
        for rec in self.board.records():
            rank = int(rec.get("rank", -1))
            if rec.get("acked") or rank == 0:
                continue
            if self._run is not None and not self._finished:
                try:
                    self._alert(failure_alert(rec, self._info.run if self._info else ""))
                    self._run.summary.update({"outcome": "failed", "failed_rank": rank})
                    self._run.finish(exit_code=1)
                except Exception as exc:
                    self.report("wandb", f"W&B failure alert failed ({type(exc).__name__}: "
                                f"{redact(str(exc), self.secret_names)})")
                self._finished = True
            self.board.ack(rank)


def failure_alert(record: dict, run: str) -> Alert:
    """The "Job failed" alert of a failure record (see FailureBoard)."""
    who = record.get("who") or f"rank {record.get('rank')}"
    text = f"run {run}: {who} failed at step {record.get('step')}: {record.get('reason')}"
    details = record.get("details") or ""
    return Alert("Job failed", text + ("\n" + details if details else ""), Level.ERROR, terminal=True)

