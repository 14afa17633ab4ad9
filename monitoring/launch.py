"""Launcher-side monitoring: extra files for a new run directory (scrape config, endpoints record).

``prometheus.yml`` is a complete Prometheus config for this one job (file_sd over the job's
target files, the alerting rules, the Pushgateway); the same file_sd block with ``*.json`` serves
a cluster-wide Prometheus. ``monitoring.json`` records where everything will be: the port scheme,
the targets directory, the W&B directory. The processes write the real endpoints at run time
(see monitoring.discovery). Its presence also tells the step script to start the node exporter.
"""

from __future__ import annotations

import json
from pathlib import Path

from configs.schema import RootConfig
from monitoring import discovery

PROMETHEUS_FILE = "prometheus.yml"
RECORD_FILE = "monitoring.json"
RULES_DIR = Path(__file__).resolve().parent / "rules"


def rule_files(workdir: str | None) -> list[str]:
    """The alerting rules as the nodes see them (the code directory may differ from this checkout)."""
    base = Path(workdir) / "monitoring" / "rules" if workdir else RULES_DIR
    return [str(base / p.name) for p in sorted(RULES_DIR.glob("*.yml"))]


def run_files(root: RootConfig, run_dir: Path) -> dict[str, str]:
    """Files (name -> text) the monitoring setup adds to a new run directory."""
    m = root.monitoring
    if not (m.prometheus or m.wandb):
        return {}
    run = run_dir.name
    record: dict[str, object] = {"run": run}
    files: dict[str, str] = {}
    if m.prometheus:
        tdir = discovery.targets_dir(m, str(run_dir))
        files[PROMETHEUS_FILE] = discovery.scrape_config(m, str(run_dir), run, rule_files(root.cluster.workdir))
        record["prometheus"] = {
            "config": str(run_dir / PROMETHEUS_FILE),
            "targets": str(tdir / f"{run}.*.json"),
            "cluster_wide_targets": str(tdir / "*.json"),
            "endpoints_record": str(run_dir / "monitoring" / "endpoints"),
            "rank_port": f"{m.port_base + 1} + local_rank (an ephemeral port when taken; the target file has "
                         "the real one)",
            "node_exporter_port": m.port_base if m.node_exporter != "off" else None,
            "hyperpod_exporters": {"dcgm": m.dcgm_exporter_port, "efa": m.efa_exporter_port,
                                   "reused_when_present": m.node_exporter == "auto"},
            "gpu_coverage": str(run_dir / "monitoring" / "gpu-coverage-<host>.json") + " (per node: which DCGM "
                            "fields come from dcgm-exporter or NVML, and which alerts and panels are blind)",
            "pushgateway": m.pushgateway_url,
        }
    if m.wandb:
        record["wandb"] = {"project": m.wandb_project or root.run_name, "entity": m.wandb_entity,
                           "mode": m.wandb_mode, "dir": str(Path(m.wandb_dir or run_dir) / "wandb"),
                           "credentials": "WANDB_API_KEY from the environment (never written here)"}
    files[RECORD_FILE] = json.dumps(record, indent=2) + "\n"
    return files
