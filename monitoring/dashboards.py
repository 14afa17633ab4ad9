"""Grafana dashboards, generated from compact specs into monitoring/dashboards/*.json.

    python -m monitoring.dashboards            # rewrite the JSON files (a test checks they are current)

Four dashboards: GPU health (dcgm-exporter names), EFA (AWS EFA exporter names), training
(throughput, MFU, loss, per-rank straggler heatmap) and checkpointing. Every panel query uses
the variables ``$run`` and ``$host`` (regexes; "All" is ``.*``) and ``$__rate_interval``. Grafana
is not needed to check them: tests run every query against a real Prometheus scraping a run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = 'run=~"$run"'
RH = 'run=~"$run", host=~"$host"'


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Q, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | table | status-history | heatmap
    description: str = ""
    width: int = 12
    height: int = 8
    thresholds: Optional[tuple[tuple[Optional[float], str], ...]] = None  # (from value, color)
    minimum: Optional[float] = None
    maximum: Optional[float] = None


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    host_variable: bool = True
    tags: tuple[str, ...] = field(default=("hyperlaunch",))


def _gpu() -> Dashboard:
    sel = RH
    by = "{{host}} GPU {{gpu}}"
    return Dashboard("hyperlaunch-gpu", "hyperlaunch / GPU health (DCGM)",
                     "dcgm-exporter series (from dcgm-exporter or the hyperlaunch node exporter via NVML).", (
        Panel("GPU utilization", (Q(f"DCGM_FI_DEV_GPU_UTIL{{{sel}}}", by),), "percent", minimum=0, maximum=100),
        Panel("Tensor core activity", (Q(f"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{sel}}}", by),), "percentunit",
              minimum=0, maximum=1),
        Panel("SM active / occupancy", (Q(f"DCGM_FI_PROF_SM_ACTIVE{{{sel}}}", f"active {by}"),
                                        Q(f"DCGM_FI_PROF_SM_OCCUPANCY{{{sel}}}", f"occupancy {by}")), "percentunit"),
        Panel("Temperature", (Q(f"DCGM_FI_DEV_GPU_TEMP{{{sel}}}", f"GPU {by}"),
                              Q(f"DCGM_FI_DEV_MEMORY_TEMP{{{sel}}}", f"HBM {by}")), "celsius",
              thresholds=((None, "green"), (80, "orange"), (87, "red"))),
        Panel("Power draw", (Q(f"DCGM_FI_DEV_POWER_USAGE{{{sel}}}", by),), "watt"),
        Panel("SM clock (MHz)", (Q(f"DCGM_FI_DEV_SM_CLOCK{{{sel}}}", by),), "none",
              description="Falls when a GPU throttles (power, thermal): a throttling GPU straggles."),
        Panel("Framebuffer used", (Q(f"DCGM_FI_DEV_FB_USED{{{sel}}}", by),), "mbytes",
              description="MiB, as dcgm-exporter reports it."),
        Panel("Throttled share of time", (
            Q(f"rate(DCGM_FI_DEV_POWER_VIOLATION{{{sel}}}[$__rate_interval]) / 1e6", f"power {by}"),
            Q(f"rate(DCGM_FI_DEV_THERMAL_VIOLATION{{{sel}}}[$__rate_interval]) / 1e6", f"thermal {by}")),
              "percentunit", minimum=0, maximum=1,
              description="Microseconds of clock throttling per second. A throttled GPU straggles."),
        Panel("NVLink throughput", (Q(f"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL{{{sel}}}", by),), "MiBs",
              description="TX + RX over all links (DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL is a rate, not a counter)."),
        Panel("PCIe throughput", (Q(f"DCGM_FI_PROF_PCIE_TX_BYTES{{{sel}}}", f"tx {by}"),
                                  Q(f"DCGM_FI_PROF_PCIE_RX_BYTES{{{sel}}}", f"rx {by}")), "Bps"),
        Panel("Last XID error per GPU", (Q(f"max by (host, gpu, UUID, err_msg) (DCGM_FI_DEV_XID_ERRORS{{{sel}}})",
                                           by, instant=True),), "none", kind="table",
              description="0 = none; latched until a driver reset. 48/63/64/74/79/92/94/95/119/120/140 are "
                          "critical (see the rules).",
              thresholds=((None, "green"), (1, "red"))),
        Panel("ECC errors (10 min)", (Q(f"increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{sel}}}[10m])", f"DBE {by}"),
                                      Q(f"increase(DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{sel}}}[10m])", f"SBE {by}")),
              "short"),
        Panel("Row remapping", (Q(f"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{{{sel}}}", f"uncorrectable {by}"),
                                Q(f"DCGM_FI_DEV_ROW_REMAP_FAILURE{{{sel}}}", f"failure {by}")), "short"),
        Panel("NVLink errors", (Q(f"rate(DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL{{{sel}}}[$__rate_interval])",
                                  f"CRC flit {by}"),
                                Q(f"rate(DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL{{{sel}}}[$__rate_interval])",
                                  f"recovery {by}")), "short"),
        Panel("Ranks on GPUs", (Q(f"hyperlaunch_rank_info{{{sel}}}", "rank {{rank}} {{host}} GPU {{gpu}}",
                                  instant=True),), kind="table",
              description="Which rank runs on which host and GPU (join key: host + gpu)."),
        Panel("Driver versions", (Q(f"count by (host, DCGM_FI_DRIVER_VERSION) (DCGM_FI_DEV_GPU_TEMP{{{sel}}})",
                                    "{{host}} {{DCGM_FI_DRIVER_VERSION}}", instant=True),), kind="table",
              description="GPUs per host and driver version (dcgm-exporter's DCGM_FI_DRIVER_VERSION label)."),
        Panel("Node exporter sources", (Q(f"hyperlaunch_node_exporter_info{{{sel}}}",
                                          "{{host}}: GPU {{gpu_source}}, EFA {{efa_source}}", instant=True),
                                        Q(f"hyperlaunch_monitoring_degraded{{{sel}}}", "{{host}} {{component}}",
                                          instant=True)), kind="table"),
    ))


def _efa() -> Dashboard:
    sel = RH
    by = "{{host}} {{device}}"
    rate = "[$__rate_interval]"
    return Dashboard("hyperlaunch-efa", "hyperlaunch / EFA", "AWS EFA exporter series (node_amazonefa_*).", (
        Panel("EFA bandwidth per node", (Q(f"sum by (host) (rate(node_amazonefa_tx_bytes{{{sel}}}{rate}))", "tx {{host}}"),
                                         Q(f"sum by (host) (rate(node_amazonefa_rx_bytes{{{sel}}}{rate}))", "rx {{host}}")),
              "Bps"),
        Panel("TX per device", (Q(f"rate(node_amazonefa_tx_bytes{{{sel}}}{rate})", by),), "Bps"),
        Panel("RDMA read / write", (Q(f"sum by (host) (rate(node_amazonefa_rdma_read_bytes{{{sel}}}{rate}))",
                                      "read {{host}}"),
                                    Q(f"sum by (host) (rate(node_amazonefa_rdma_write_bytes{{{sel}}}{rate}))",
                                      "write {{host}}")), "Bps"),
        Panel("Packets", (Q(f"sum by (host) (rate(node_amazonefa_tx_pkts{{{sel}}}{rate}))", "tx {{host}}"),
                          Q(f"sum by (host) (rate(node_amazonefa_rx_pkts{{{sel}}}{rate}))", "rx {{host}}")), "pps"),
        Panel("Retransmitted packets", (Q(f"rate(node_amazonefa_retrans_pkts{{{sel}}}{rate})", by),), "pps",
              description="Bursts mean congestion or a flapping link; see EfaRetransmitBurst."),
        Panel("Retransmit ratio", (Q(f"rate(node_amazonefa_retrans_pkts{{{sel}}}{rate}) / "
                                     f"clamp_min(rate(node_amazonefa_tx_pkts{{{sel}}}{rate}), 1)", by),),
              "percentunit", thresholds=((None, "green"), (0.001, "orange"), (0.01, "red"))),
        Panel("Impaired / unresponsive remotes (5 min)",
              (Q(f"increase(node_amazonefa_impaired_remote_conn_events{{{sel}}}[5m])", f"impaired {by}"),
               Q(f"increase(node_amazonefa_unresponsive_remote_events{{{sel}}}[5m])", f"unresponsive {by}")), "short"),
        Panel("Retransmit timeouts, drops, RDMA errors (5 min)",
              (Q(f"increase(node_amazonefa_retrans_timeout_events{{{sel}}}[5m])", f"timeouts {by}"),
               Q(f"increase(node_amazonefa_rx_drops{{{sel}}}[5m])", f"rx drops {by}"),
               Q(f"increase(node_amazonefa_rdma_read_wr_err{{{sel}}}[5m]) + "
                 f"increase(node_amazonefa_rdma_write_wr_err{{{sel}}}[5m])", f"RDMA errors {by}")), "short"),
        Panel("EFA devices per node", (Q(f"count by (host) (node_amazonefa_info{{{sel}}})", "found {{host}}"),
                                       Q(f"hyperlaunch_efa_expected_devices{{{sel}}}", "expected {{host}}")), "short",
              kind="stat", description="Fewer than expected: NCCL may be falling back to TCP sockets."),
    ))


def _goodput_row() -> tuple[Panel, ...]:
    """The top row: how far along, when it ends, what it costs, where the wall time went (trainer.tracker)."""
    def job(metric: str) -> str:
        return f"max by (run) ({metric}{{{R}}})"

    return (
        Panel("Progress (tokens)", (Q(job("hyperlaunch_progress_ratio"), "{{run}}"),), "percentunit", kind="stat",
              width=4, height=5, minimum=0, maximum=1,
              description="Consumed / total tokens; milestones at 10/25/50/75/90/100% alert in W&B."),
        Panel("ETA", (Q(job("hyperlaunch_eta_seconds"), "{{run}}"),), "s", kind="stat", width=4, height=5,
              description="Remaining steps x the smoothed recent wall time per step (checkpoints and evaluation included)."),
        Panel("Elapsed (restarts included)", (Q(job("hyperlaunch_elapsed_seconds"), "{{run}}"),), "s", kind="stat",
              width=4, height=5),
        Panel("Goodput", (Q(job("hyperlaunch_goodput_ratio"), "{{run}}"),), "percentunit", kind="stat", width=4,
              height=5, minimum=0, maximum=1, thresholds=((None, "red"), (0.8, "orange"), (0.9, "green")),
              description="Productive training time / wall time since the first attempt."),
        Panel("Cost so far / projected", (Q(job("hyperlaunch_cost_usd"), "so far {{run}}"),
                                          Q(job("hyperlaunch_projected_cost_usd"), "projected {{run}}")),
              "currencyUSD", kind="stat", width=4, height=5,
              description="cluster.price_per_node_hour x nodes x wall hours; projected = so far / progress."),
        Panel("Plan vs actual (measured / predicted)", (Q(job("hyperlaunch_plan_step_time_ratio"), "step time {{run}}"),
                                                        Q(job("hyperlaunch_plan_memory_ratio"), "peak memory {{run}}")),
              "none", kind="stat", width=4, height=5, thresholds=((None, "green"), (1.25, "orange"), (1.5, "red")),
              description="Against the run's prediction.json; the run log's plan line names the likely cause of a drift."),
        Panel("Where the wall time went", (Q(f"max by (run, category) (hyperlaunch_wall_seconds{{{R}}})",
                                             "{{category}}"),), "s", width=12, height=8,
              description="The goodput ledger: productive, start-up and reload, checkpoint stalls, evaluation, data "
                          "waits, restarts (downtime and redone steps), straggler slowdown, other."),
        Panel("Restarts", (Q(job("hyperlaunch_run_attempts"), "attempts {{run}}"),
                           Q(job("hyperlaunch_redone_steps"), "redone steps {{run}}"),
                           Q(f"{job('hyperlaunch_restart_lost_seconds')} or {job('hyperlaunch_run_attempts')} * 0",
                             "last restart lost s {{run}}")), "short", width=6, height=8,
              description="Attempts (1 + restarts and requeues), steps trained again, and what the last restart "
                          "cost (detection, down, reload, redone work; 0 before any restart)."),
        Panel("Tokens per GPU-hour", (Q(job("hyperlaunch_tokens_per_gpu_hour"), "{{run}}"),), "short", width=6,
              height=8, description="Tokens consumed / (wall hours x GPUs): goodput and throughput in one number."),
    )


def _training() -> Dashboard:
    rate = "[$__rate_interval]"
    return Dashboard("hyperlaunch-training", "hyperlaunch / Training",
                     "Progress and goodput against the plan, throughput, MFU, loss and the per-rank straggler view "
                     "of hyperlaunch runs.", (
        *_goodput_row(),
        Panel("Throughput", (Q(f"max by (run) (hyperlaunch_train_tokens_per_second{{{R}}})", "tokens/s {{run}}"),
                             Q(f"max by (run) (hyperlaunch_throughput_baseline_tokens_per_second{{{R}}})",
                               "baseline {{run}}")), "short"),
        Panel("MFU", (Q(f"max by (run) (hyperlaunch_train_mfu_ratio{{{R}}})", "{{run}}"),), "percentunit",
              minimum=0, description="Model FLOPs utilization against the GPU type's dense BF16 peak."),
        Panel("TFLOP/s per GPU", (Q(f"max by (run) (hyperlaunch_train_tflops_per_gpu{{{R}}})", "{{run}}"),), "short"),
        Panel("Loss", (Q(f"max by (run) (hyperlaunch_train_loss{{{R}}})", "{{run}}"),), "short"),
        Panel("Gradient norm / learning rate", (Q(f"max by (run) (hyperlaunch_train_grad_norm{{{R}}})", "grad norm {{run}}"),
                                                Q(f"max by (run) (hyperlaunch_train_learning_rate{{{R}}})", "lr {{run}}")),
              "short"),
        Panel("Step time", (Q(f"max by (run) (hyperlaunch_train_step_seconds{{{R}}})", "last {{run}}"),
                            Q(f"max by (run) (rate(hyperlaunch_train_step_duration_seconds_sum{{{R}}}{rate}) / "
                              f"rate(hyperlaunch_train_step_duration_seconds_count{{{R}}}{rate}))", "mean {{run}}"),
                            Q(f"histogram_quantile(0.9, sum by (run, le) (rate("
                              f"hyperlaunch_train_step_duration_seconds_bucket{{{R}}}{rate})))", "p90 {{run}}")), "s"),
        Panel("Per-rank straggler heatmap (score)", (Q(f"hyperlaunch_straggler_score{{{R}}}",
                                                       "rank {{rank}} {{host}} GPU {{gpu}}"),),
              "none", kind="status-history", width=24, height=10, minimum=0, maximum=1,
              thresholds=((None, "red"), (0.93, "orange"), (0.96, "green")),
              description="One row per rank; 1 = as fast as its peers. Red below the raise threshold."),
        Panel("Per-rank compute time / fastest rank", (Q(
            f"hyperlaunch_train_compute_seconds{{{R}}} / on (run) group_left "
            f"min by (run) (hyperlaunch_train_compute_seconds{{{R}}})", "rank {{rank}} {{host}} GPU {{gpu}}"),),
              "none", kind="heatmap", width=24, height=10,
              description="Raw per-step compute of every rank relative to the fastest (no window, no hysteresis)."),
        Panel("Flagged stragglers", (Q(f"max by (run) (hyperlaunch_stragglers{{{R}}})", "{{run}}"),
                                     Q(f"hyperlaunch_straggler_flagged{{{R}}} == 1", "rank {{rank}} {{host}} GPU {{gpu}}")),
              "short", thresholds=((None, "green"), (1, "red"))),
        Panel("Throughput drop", (Q(f"max by (run) (hyperlaunch_throughput_drop{{{R}}})", "{{run}}"),), "short",
              kind="stat", thresholds=((None, "green"), (1, "red"))),
        Panel("Compute time per rank (p90)", (Q(
            f"histogram_quantile(0.9, sum by (run, rank, le) (rate(hyperlaunch_train_compute_duration_seconds_bucket"
            f"{{{R}}}{rate})))", "rank {{rank}}"),), "s",
              description="From the per-rank compute-time histogram; the heatmap above shows the last step."),
        Panel("Data-loader wait per rank", (Q(f"hyperlaunch_train_data_wait_seconds{{{R}}}", "last rank {{rank}}"),
                                            Q(f"histogram_quantile(0.9, sum by (run, rank, le) (rate("
                                              f"hyperlaunch_train_data_wait_duration_seconds_bucket{{{R}}}{rate})))",
                                              "p90 rank {{rank}}")), "s"),
        Panel("Job state", (Q(f"max by (run, state) (hyperlaunch_job_state{{{R}}}) == 1", "{{run}} {{state}}",
                              instant=True),), kind="table"),
        Panel("Ranks up", (Q(f'count by (run) (up{{job="hyperlaunch-ranks", {R}}} == 1)', "{{run}}"),), "short",
              kind="stat"),
        Panel("Monitoring overhead (share of step time)", (Q(
            f"rate(hyperlaunch_monitoring_overhead_seconds_total{{{R}}}{rate}) / "
            f"rate(hyperlaunch_train_step_duration_seconds_sum{{{R}}}{rate})", "rank {{rank}}"),), "percentunit"),
    ), host_variable=False)


def _checkpointing() -> Dashboard:
    ops = f'hyperlaunch_checkpoint_operations_total{{{R}}}'
    return Dashboard("hyperlaunch-checkpointing", "hyperlaunch / Checkpointing",
                     "Fed by monitoring.record_checkpoint from the checkpoint code.", (
        Panel("Training blocked per save", (Q(f"max by (run) (hyperlaunch_checkpoint_blocking_seconds{{{R}}})",
                                              "{{run}}"),), "s"),
        Panel("Save time (async included)", (Q(f"max by (run) (hyperlaunch_checkpoint_save_seconds{{{R}}})",
                                               "{{run}}"),), "s"),
        Panel("Replication time", (Q(f"max by (run) (hyperlaunch_checkpoint_replication_seconds{{{R}}})",
                                     "{{run}}"),), "s"),
        Panel("Checkpoint size (per rank, max)", (Q(f"max by (run) (hyperlaunch_checkpoint_size_bytes{{{R}}})",
                                                    "{{run}}"),), "bytes"),
        Panel("Operations by outcome", (Q(f"sum by (run, operation, outcome) (increase({ops}[5m]))",
                                          "{{operation}} {{outcome}}"),), "short"),
        Panel("Failures (30 min)", (Q(f'sum by (run, operation) (increase(hyperlaunch_checkpoint_operations_total'
                                      f'{{{R}, outcome="failed"}}[30m]))', "{{operation}}"),), "short",
              thresholds=((None, "green"), (1, "red"))),
        Panel("Since the last successful operation", (Q(
            f"time() - max by (run, operation) (hyperlaunch_checkpoint_last_success_timestamp_seconds{{{R}}})",
            "{{operation}}"),), "s", kind="stat"),
    ), host_variable=False)


DASHBOARDS: tuple[Dashboard, ...] = (_gpu(), _efa(), _training(), _checkpointing())


def _thresholds(spec: Optional[tuple[tuple[Optional[float], str], ...]]) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in (spec or ((None, "green"),))]
    return {"mode": "absolute", "steps": steps}


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit, "thresholds": _thresholds(p.thresholds),
                                "color": {"mode": "thresholds" if p.kind in ("status-history", "stat") else "palette-classic"}}
    if p.minimum is not None:
        defaults["min"] = p.minimum
    if p.maximum is not None:
        defaults["max"] = p.maximum
    targets = []
    for i, q in enumerate(p.queries):
        t: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DS, "expr": q.expr, "legendFormat": q.legend,
                             "range": not q.instant, "instant": q.instant}
        if p.kind == "table":
            t["format"] = "table"
        targets.append(t)
    options: dict[str, Any] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                               "tooltip": {"mode": "multi", "sort": "desc"}}
    if p.kind == "heatmap":
        options = {"calculate": False, "yAxis": {"axisPlacement": "left"}, "color": {"scheme": "RdYlGn",
                   "reverse": True, "mode": "scheme"}, "cellGap": 1, "rowsFrame": {"layout": "auto"}}
    elif p.kind == "status-history":
        options = {"showValue": "never", "rowHeight": 0.9, "colWidth": 0.9, "legend": {"showLegend": True}}
    return {"id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DS,
            "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options, "targets": targets}


def _variables(d: Dashboard) -> list[dict[str, Any]]:
    def query_var(name: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": name, "type": "query", "datasource": DS, "definition": query,
                "query": {"query": query, "refId": name}, "refresh": 2, "includeAll": True, "multi": True,
                "allValue": ".*", "current": {}, "sort": 1, "hide": 0}

    out = [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {},
            "hide": 0},
           query_var("run", "label_values(hyperlaunch_job_state, run)")]
    if d.host_variable:
        out.append(query_var("host", 'label_values(up{run=~"$run"}, host)'))
    return out


def render(d: Dashboard) -> dict[str, Any]:
    panels, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel(p, i, x, y))
        x, row_h = x + p.width, max(row_h, p.height)
    return {"uid": d.uid, "title": d.title, "description": d.description, "tags": list(d.tags), "timezone": "utc",
            "editable": True, "schemaVersion": 38, "version": 1, "refresh": "30s", "graphTooltip": 1,
            "time": {"from": "now-6h", "to": "now"}, "annotations": {"list": []},
            "templating": {"list": _variables(d)}, "panels": panels}


def file_name(d: Dashboard) -> str:
    return d.uid.replace("hyperlaunch-", "") + ".json"


def render_all() -> dict[str, str]:
    return {file_name(d): json.dumps(render(d), indent=2) + "\n" for d in DASHBOARDS}


def main() -> int:
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in render_all().items():
        (OUT_DIR / name).write_text(text)
        print(OUT_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
