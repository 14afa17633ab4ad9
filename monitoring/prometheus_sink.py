"""The Prometheus sink: one HTTP exporter per rank, registered for discovery, and an optional push.

Every rank serves its own registry on ``port_base + 1 + local_rank`` (an ephemeral port when that
one is taken: the target file holds the real address). Rank 0 also exports the job-level series
(state, stragglers, throughput drop) and, with ``pushgateway_url``, pushes them so the outcome of
a job outlives its processes. A rank that fails pushes its own ``failed`` state; a run that ends
cleanly deletes its Pushgateway groups (pushed series never expire), and a requeued run deletes
the groups its earlier attempt left before it pushes again.

Hygiene: no ``_created`` series (prometheus_client would add one per counter and histogram);
step, compute and data-wait times are histograms with buckets for 50 ms to minutes-long steps.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, delete_from_gateway,
                               disable_created_metrics, push_to_gateway, start_http_server)

from monitoring import discovery
from monitoring import names as n
from configs.monitoring_config import MonitoringConfig
from monitoring.events import (CheckpointEvent, Operation, Outcome, ProgressSample, RankIdentity, RunInfo,
                               StepSample, StragglerReport, ThroughputReport, ValidationSample)
from monitoring.sinks import MetricSink

Report = Callable[[str, str], None]  # (component, message): something is missing
PUSH_JOB = "hyperlaunch"  # the Pushgateway job label; groups are {run, rank}
# seconds; CPU toy steps take ~50 ms, a 405B step on 64 nodes ~30 s
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
DATA_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)  # a healthy loader: under 10 ms

disable_created_metrics()  # process-wide: every exporter here (ranks, node exporter) serves no _created series


def serve(registry: CollectorRegistry, bind: str, port: int) -> tuple[object, int, Optional[str]]:
    """Start an exporter on ``port``, or on an ephemeral port when it is taken.

    Returns (server, bound port, problem or None); raises OSError when nothing can be bound.
    """
    try:
        server, _ = start_http_server(port, addr=bind, registry=registry)
        return server, int(server.server_port), None
    except OSError as exc:
        server, _ = start_http_server(0, addr=bind, registry=registry)
        bound = int(server.server_port)
        return server, bound, (f"port {port} is taken ({exc.strerror or exc}); serving metrics on {bound} "
                               "instead (the target file records it, so Prometheus still finds this process)")


def stop(server: object) -> None:
    shutdown = getattr(server, "shutdown", None)
    if shutdown is not None:
        shutdown()
        server.server_close()  # type: ignore[attr-defined]


class PrometheusSink(MetricSink):
    name = "prometheus"

    def __init__(self, cfg: MonitoringConfig, identity: RankIdentity, advertise_host: str, report: Report):
        self.cfg = cfg
        self.identity = identity
        self.job_level = identity.rank == 0
        self.advertise_host = advertise_host
        self.report = report
        self.registry = CollectorRegistry()
        self.push_registry = CollectorRegistry()
        self.port: Optional[int] = None
        self.target: Optional[Path] = None
        self._server: object = None
        self._run: Optional[RunInfo] = None
        self._stop = threading.Event()
        self._pusher: Optional[threading.Thread] = None
        self._push_failing = False
        self._build()

    # -- metrics -------------------------------------------------------------------------------

    def _build(self) -> None:
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), push: bool = False) -> Gauge:
            g = Gauge(name, doc, labels, registry=r)
            if push:
                self.push_registry.register(g)
            return g

        self.step_g = gauge(n.TRAIN_STEP, "Last completed optimizer step.", push=True)
        self.step_s = gauge(n.TRAIN_STEP_SECONDS, "Wall time of the last step (equal on all ranks).")
        self.step_hist = Histogram(n.TRAIN_STEP_DURATION, "Step wall times.", registry=r, buckets=STEP_BUCKETS)
        self.compute_s = gauge(n.TRAIN_COMPUTE_SECONDS, "This rank's compute time in the last step.")
        self.compute_hist = Histogram(n.TRAIN_COMPUTE_DURATION, "This rank's compute times.", registry=r,
                                      buckets=STEP_BUCKETS)
        self.wait_s = gauge(n.TRAIN_DATA_WAIT_SECONDS, "Data-loader wait of this rank in the last step.")
        self.wait_hist = Histogram(n.TRAIN_DATA_WAIT_DURATION, "Data-loader waits of this rank.", registry=r,
                                   buckets=DATA_WAIT_BUCKETS)
        self.tps = gauge(n.TRAIN_TOKENS_PER_SECOND, "Job throughput in the last step.", push=True)
        self.tokens = Counter(n.TRAIN_TOKENS, "Tokens trained by the job (the same count on every rank).", registry=r)
        self.tflops = gauge(n.TRAIN_TFLOPS_PER_GPU, "Model TFLOP/s per GPU in the last step.")
        self.mfu = gauge(n.TRAIN_MFU, "Model FLOPs utilization (0-1); absent on CPU.")
        self.loss = gauge(n.TRAIN_LOSS, "Global mean loss of the last step.", push=True)
        self.grad_norm = gauge(n.TRAIN_GRAD_NORM, "Gradient norm of the last step.")
        self.lr = gauge(n.TRAIN_LR, "Learning rate of the last step.")
        self.val_loss = gauge(n.VALIDATION_LOSS, "Validation loss of the last pass (source=all: every source).",
                              ("source",), push=True)
        self.val_ppl = gauge(n.VALIDATION_PERPLEXITY, "Validation perplexity of the last pass.", ("source",))
        self.score = gauge(n.STRAGGLER_SCORE, "This rank's straggler score (1 = as fast as its peers).")
        self.relative = gauge(n.STRAGGLER_RELATIVE, "Reference compute median / this rank's (capped at 1).")
        self.individual = gauge(n.STRAGGLER_INDIVIDUAL, "This rank's best compute median / its current one.")
        self.flagged = gauge(n.STRAGGLER_FLAGGED, "1 while this rank is flagged as a straggler.")
        self.ckpt = {op: gauge(name, f"Seconds of the last checkpoint {op.value} operation.")
                     for op, name in ((Operation.BLOCKING, n.CKPT_BLOCKING), (Operation.SAVE, n.CKPT_SAVE),
                                      (Operation.REPLICATION, n.CKPT_REPLICATION))}
        self.ckpt_size = gauge(n.CKPT_SIZE, "Bytes of the last checkpoint this rank wrote.")
        self.ckpt_ops = Counter(n.CKPT_OPERATIONS, "Checkpoint operations by outcome.", ("operation", "outcome"),
                                registry=r)
        self.ckpt_last_ok = gauge(n.CKPT_LAST_SUCCESS, "Unix time of the last successful operation.", ("operation",))
        self.state = gauge(n.JOB_STATE, "This rank's view of the job state (one-hot).", ("state",), push=True)
        self.started = gauge(n.JOB_START, "Unix time the training loop started.", push=True)
        self.ended = gauge(n.JOB_END, "Unix time the training loop ended.", push=True)
        self.degraded_g = gauge(n.DEGRADED, "1 while a part monitoring needs is missing.", ("component",))
        self.overhead = Counter(n.OVERHEAD, "Seconds the monitoring callback took on this rank.", registry=r)
        self.info = gauge(n.RANK_INFO, "Where this rank runs.", ("gpu_uuid", "gpu_name", "pp_rank", "tp_rank",
                                                                   "dp_rank"))
        if self.job_level:
            self.world = gauge(n.JOB_WORLD_SIZE, "Ranks in the job.", push=True)
            self.stragglers_g = gauge(n.STRAGGLERS, "Ranks flagged as stragglers now.", push=True)
            self.drop = gauge(n.THROUGHPUT_DROP, "1 while the job runs below its throughput baseline.", push=True)
            self.baseline = gauge(n.THROUGHPUT_BASELINE, "Recent best window median of tokens/s.", push=True)
            self._build_progress(gauge)
        for comp in ("rank_port", "discovery", "pushgateway", "wandb"):
            self.degraded_g.labels(comp).set(0)
        for op in Operation:
            self.ckpt_ops.labels(op.value, "ok")
            self.ckpt_ops.labels(op.value, "failed")

    def _build_progress(self, gauge: Callable[..., Gauge]) -> None:
        """Rank 0's run-level series: progress, the goodput ledger and plan vs actual (all pushed)."""
        self.progress_g = gauge(n.PROGRESS, "Consumed / total tokens of the run (0-1).", push=True)
        self.progress_tokens = gauge(n.PROGRESS_TOKENS, "Tokens the run has consumed.", push=True)
        self.progress_target = gauge(n.PROGRESS_TOKENS_TARGET, "Tokens the run trains in total.", push=True)
        self.milestone = gauge(n.MILESTONE, "Highest progress milestone reached (10/25/50/75/90/100).", push=True)
        self.eta = gauge(n.ETA, "Estimated seconds to the end (smoothed recent wall time per step).", push=True)
        self.elapsed = gauge(n.ELAPSED, "Wall seconds since the run's first attempt started.", push=True)
        self.goodput = gauge(n.GOODPUT, "Productive training time / wall time (0-1).", push=True)
        self.wall = gauge(n.WALL, "Wall seconds of the run by category (the goodput ledger).", ("category",), push=True)
        self.tokens_gpu_hour = gauge(n.TOKENS_PER_GPU_HOUR, "Tokens per GPU-hour of wall time.", push=True)
        self.cost = gauge(n.COST, "Cost so far (cluster.price_per_node_hour x nodes x wall hours).", push=True)
        self.cost_projected = gauge(n.COST_PROJECTED, "Cost so far / progress.", push=True)
        self.attempts = gauge(n.ATTEMPTS, "Processes that trained this run (1 + restarts and requeues).", push=True)
        self.redone = gauge(n.REDONE_STEPS, "Steps trained again after restarts.", push=True)
        self.restart_lost = gauge(n.RESTART_LOST, "Seconds the last restart cost (detection, down, reload, redone).",
                                  push=True)
        self.plan_step = gauge(n.PLAN_STEP_RATIO, "Measured / predicted step time (prediction.json).", push=True)
        self.plan_memory = gauge(n.PLAN_MEMORY_RATIO, "Measured / predicted peak memory.", push=True)

    # -- events --------------------------------------------------------------------------------

    def start(self, run: RunInfo) -> None:
        self._run = run
        ident = self.identity
        self.info.labels(ident.gpu_uuid, ident.gpu_name, str(ident.pp_rank), str(ident.tp_rank),
                         str(ident.dp_rank)).set(1)
        self._set_state("running")
        self.started.set(time.time())
        if self.job_level:
            self.world.set(run.world_size)
            self.stragglers_g.set(0)
            self.drop.set(0)
        port = self.cfg.port_base + 1 + ident.local_rank
        try:
            self._server, self.port, problem = serve(self.registry, self.cfg.bind_address, port)
        except OSError as exc:
            self._degrade("rank_port", f"cannot serve Prometheus metrics on any port ({exc}); "
                          "this rank is not scraped" + (" (the Pushgateway still gets the job state)"
                                                        if self.cfg.pushgateway_url else ""))
        else:
            if problem:
                self._degrade("rank_port", problem)
            self._register(run)
        if self.cfg.pushgateway_url and self.job_level:
            self._delete_groups(run, report=False)  # an earlier attempt's (a requeue); the push below reports
            self._push()
            self._pusher = threading.Thread(target=self._push_loop, name="prometheus-push", daemon=True)
            self._pusher.start()

    def _register(self, run: RunInfo) -> None:
        if not run.run_dir:
            self._degrade("discovery", f"no run directory (HYPERLAUNCH_RUN_DIR is unset): metrics are served on "
                          f"port {self.port} but no target file tells Prometheus where")
            return
        ident = self.identity
        labels = {"run": run.run, "rank": str(ident.rank), "local_rank": str(ident.local_rank), "host": ident.host,
                  "gpu": ident.gpu, "slurm_job": run.slurm_job}
        try:
            self.target = discovery.register(self.cfg, run.run_dir, run.run, "rank", f"{ident.rank:05d}",
                                             f"{self.advertise_host}:{self.port}", labels)
        except OSError as exc:
            self._degrade("discovery", f"cannot write the Prometheus target file ({exc}); "
                          f"metrics are served on port {self.port} but Prometheus will not find them")

    def step(self, s: StepSample) -> None:
        self.step_g.set(s.step)
        self.step_s.set(s.step_time_s)
        self.step_hist.observe(s.step_time_s)
        self.compute_s.set(s.compute_s)
        self.compute_hist.observe(s.compute_s)
        self.wait_s.set(s.data_wait_s)
        self.wait_hist.observe(s.data_wait_s)
        self.tps.set(s.tokens_per_s)
        self.tokens.inc(s.tokens)
        self.tflops.set(s.tflops_per_gpu)
        if s.mfu_percent is not None:
            self.mfu.set(s.mfu_percent / 100.0)
        self.loss.set(s.loss)
        if s.grad_norm is not None:
            self.grad_norm.set(s.grad_norm)
        self.lr.set(s.lr)

    def progress(self, p: ProgressSample) -> None:
        if not self.job_level:
            return
        self.progress_g.set(p.fraction)
        self.progress_tokens.set(p.tokens_done)
        self.progress_target.set(p.tokens_total)
        if p.milestone is not None:
            self.milestone.set(p.milestone)
        if p.eta_s is not None:
            self.eta.set(p.eta_s)
        self.elapsed.set(p.elapsed_s)
        self.goodput.set(p.goodput)
        for category, seconds in p.seconds.items():
            self.wall.labels(category).set(seconds)
        self.tokens_gpu_hour.set(p.tokens_per_gpu_hour)
        if p.cost_usd is not None:
            self.cost.set(p.cost_usd)
        if p.projected_cost_usd is not None:
            self.cost_projected.set(p.projected_cost_usd)
        self.attempts.set(p.attempts)
        self.redone.set(p.redone_steps)
        if p.last_restart_lost_s is not None:
            self.restart_lost.set(p.last_restart_lost_s)
        if p.plan_step_time_ratio is not None:
            self.plan_step.set(p.plan_step_time_ratio)
        if p.plan_memory_ratio is not None:
            self.plan_memory.set(p.plan_memory_ratio)

    def stragglers(self, report: StragglerReport) -> None:
        for sc in report.scores:
            if sc.rank == self.identity.rank:
                self.score.set(sc.score)
                self.relative.set(sc.relative)
                self.individual.set(sc.individual)
                self.flagged.set(1 if sc.flagged else 0)
        if self.job_level:
            self.stragglers_g.set(len(report.flagged))

    def throughput(self, report: ThroughputReport) -> None:
        if self.job_level:
            self.drop.set(1 if report.dropped else 0)
            self.baseline.set(report.baseline)

    def validation(self, v: ValidationSample) -> None:
        for source, loss in (("all", v.loss), *v.per_source.items()):
            self.val_loss.labels(source).set(loss)
            self.val_ppl.labels(source).set(math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan"))

    def checkpoint(self, event: CheckpointEvent) -> None:
        op = event.operation.value
        self.ckpt_ops.labels(op, "ok" if event.ok else "failed").inc()
        if event.ok:
            self.ckpt[event.operation].set(event.seconds)
            self.ckpt_last_ok.labels(op).set(event.timestamp or time.time())
            if event.size_bytes is not None:
                self.ckpt_size.set(event.size_bytes)

    def degraded(self, component: str, message: str) -> None:
        self.degraded_g.labels(component).set(1)

    def add_overhead(self, seconds: float) -> None:
        self.overhead.inc(seconds)

    def finish(self, outcome: Outcome) -> None:
        self._set_state(outcome.state)
        self.ended.set(time.time())
        self._stop.set()
        if self._pusher is not None:
            self._pusher.join(timeout=10)  # a push in flight would bring a deleted group back
        if self.cfg.pushgateway_url and outcome.state == "failed":
            self._push()  # kept: HyperlaunchJobFailed fires even when the job was gone before a scrape
        elif self.cfg.pushgateway_url and self.job_level and self._run is not None:
            self._delete_groups(self._run, report=True)  # a clean end: nothing to alert on, nothing to keep
        if outcome.state == "failed" and self.cfg.final_scrape_grace_s > 0 and self._server is not None:
            time.sleep(self.cfg.final_scrape_grace_s)  # let Prometheus scrape the failed state once
        if outcome.state != "failed":  # a failed rank keeps its target: `up == 0` shows it until requeued
            discovery.unregister(self.target)  # before the server stops, so a clean end is never "down"
            self.target = None
        if self._server is not None:
            stop(self._server)
            self._server = None

    # -- helpers -------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        for s in n.JOB_STATES:
            self.state.labels(s).set(1 if s == state else 0)

    def _degrade(self, component: str, message: str) -> None:
        self.degraded_g.labels(component).set(1)
        self.report(component, message)

    def _push_loop(self) -> None:
        while not self._stop.wait(self.cfg.push_interval_s):
            self._push()

    def _delete_groups(self, run: RunInfo, report: bool) -> None:
        """Delete every group of this run (a failed rank pushed its own), found through the Pushgateway's API."""
        url = self.cfg.pushgateway_url
        if url is None:
            return
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/metrics", timeout=5) as resp:
                groups = [g.get("labels", {}) for g in json.loads(resp.read()).get("data", [])]
            for labels in groups:
                if labels.get("job") == PUSH_JOB and labels.get("run") == run.run:
                    delete_from_gateway(url, job=PUSH_JOB, timeout=5,
                                        grouping_key={k: v for k, v in labels.items() if k != "job"})
        except Exception as exc:
            if report:
                self._degrade("pushgateway", f"cannot delete the groups of run {run.run} from the Pushgateway "
                              f"{url} ({type(exc).__name__}: {exc}); they never expire: delete them by hand")

    def _push(self) -> None:
        url = self.cfg.pushgateway_url
        if self._run is None or url is None:
            return
        try:
            push_to_gateway(url, job=PUSH_JOB, registry=self.push_registry, timeout=5,
                            grouping_key={"run": self._run.run, "rank": str(self.identity.rank)})
        except Exception as exc:
            if not self._push_failing:
                self._push_failing = True
                self._degrade("pushgateway", f"cannot push to the Pushgateway {self.cfg.pushgateway_url} "
                              f"({type(exc).__name__}: {exc}); retrying every {self.cfg.push_interval_s:g} s, "
                              "the job state is only scraped meanwhile")
            return
        if self._push_failing:
            self._push_failing = False
            self.degraded_g.labels("pushgateway").set(0)
