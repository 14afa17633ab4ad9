"""One exporter per node and run: GPU metrics (dcgm-exporter names) and EFA counters (AWS names).

    python -m monitoring.node_exporter --run-dir <run dir> [--parent-pid <pid>]

Started by the step script on every Slurm node (before torchrun, so GPU and EFA state is visible
during start-up and hangs) or by local rank 0 for local runs. In ``node_exporter=auto`` mode it
first looks for exporters the node already runs (HyperPod: dcgm-exporter on 9400, the EFA exporter
on 9109): when one answers, it records that endpoint for the run instead of duplicating it.
It serves on ``port_base`` (an ephemeral port when taken), writes its file_sd target, and exits
when its parent (torchrun, or the rank) is gone, removing the target.

When it defers to a dcgm-exporter, it scrapes it once and serves the DCGM fields our rules and
panels need that it lacks from NVML (monitoring.dcgm_coverage); what nobody serves is written to
``<run dir>/monitoring/gpu-coverage-<host>.json`` with the alerts and panels that are blind.

Missing pieces are said once and exported as ``hyperlaunch_monitoring_degraded{component}``:
``nvml`` (a GPU job without a usable NVML), ``dcgm_fields`` (alerts blind on this node),
``efa_sysfs`` (fewer EFA devices than the cluster config promises), ``node_exporter_port``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Gauge

from cluster.local import process_alive
from configs.schema import ClusterConfig
from configs.monitoring_config import MonitoringConfig
from monitoring import discovery
from monitoring import names as n
from monitoring.dcgm_coverage import Coverage, plan, served_fields
from monitoring.efa import EfaCollector, EfaSysfs
from monitoring.gpu import XID, DcgmCollector, GpuSource, open_gpu_source
from monitoring.prometheus_sink import serve, stop

STARTED_ENV = "HYPERLAUNCH_NODE_EXPORTER"  # set by whoever started one, so nobody starts a second


def probe(port: int, prefix: str, timeout_s: float = 1.0) -> bool:
    """True when something on this node's ``port`` serves metrics starting with ``prefix``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
            return prefix.encode() in resp.read(4 << 20)
    except (OSError, ValueError):
        return False


def _readable(source: GpuSource) -> frozenset[str]:
    """The fields NVML gives on this node (two samples: GPM and NVLink rates need a previous one)."""
    devices = source.devices()
    if not devices:
        return frozenset()
    first = set(source.read(devices[0]))
    time.sleep(0.2)
    return frozenset(first | set(source.read(devices[0])) | {XID})


def write_coverage(run_dir: str, host: str, cov: Coverage, **extra: object) -> Path:
    path = Path(run_dir) / "monitoring" / f"gpu-coverage-{re.sub(r'[^A-Za-z0-9._-]+', '-', host)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cov.record(host=host, **extra), indent=1) + "\n")
    return path


def serve_gpu(m: MonitoringConfig, c: ClusterConfig, host: str, run_dir: str, registry: CollectorRegistry,
              external: Callable[[str, int], None], degrade: Callable[[str, str], None]
              ) -> tuple[str, list[DcgmCollector]]:
    """Register the GPU collector this node needs; returns (where GPU metrics come from, collectors)."""
    served = served_fields(m.dcgm_exporter_port) if m.node_exporter == "auto" else None
    if served is not None:
        external("dcgm-exporter", m.dcgm_exporter_port)
    source, why = open_gpu_source()
    if source is None and served is None:
        if c.gpu_type != "cpu":
            degrade("nvml", f"NVML is not available ({why}): no GPU metrics (DCGM_FI_*) from this node, and no "
                    f"dcgm-exporter answers on port {m.dcgm_exporter_port}")
        return "none", []
    cov = plan(served or frozenset(), _readable(source) if source is not None else frozenset())
    collectors = []
    if source is not None and (served is None or cov.from_nvml):
        collectors.append(DcgmCollector(source, host, only=cov.from_nvml if served is not None else None))
        registry.register(collectors[0])
    kind = "nvml" if served is None else ("dcgm-exporter+nvml" if collectors else "dcgm-exporter")
    try:
        path: object = write_coverage(run_dir, host, cov, gpu_source=kind, dcgm_exporter_port=m.dcgm_exporter_port,
                                      nvml=why or "available")
    except OSError as exc:
        path = f"not written: {exc}"
    if cov.blind_rules:
        where = (f"the dcgm-exporter on port {m.dcgm_exporter_port} does not serve" if served is not None
                 else "NVML does not give")
        degrade("dcgm_fields", f"{where} {', '.join(sorted(cov.missing))}"
                f"{f' and NVML cannot ({why})' if source is None else ''}: these alerts cannot fire on this node: "
                f"{', '.join(cov.blind_rules)} (details: {path}; HyperPod: install the observability stack with "
                "--advanced, or give dcgm-exporter a field list with these fields)")
    return kind, collectors


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.node_exporter", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)

    from configs.loading import load_run_config

    root = load_run_config(Path(args.run_dir) / "config.yaml")
    m, c = root.monitoring, root.cluster
    if m.node_exporter == "off":
        return 0
    host = socket.gethostname()
    run = Path(args.run_dir).resolve().name
    slurm_job = os.environ.get("SLURM_JOB_ID", "")
    advertise = "127.0.0.1" if c.kind == "local" else host

    def say(message: str) -> None:
        print(f"monitoring: node {host}: {message}", flush=True)

    registry = CollectorRegistry()
    degraded = Gauge(n.DEGRADED, "1 while a part monitoring needs is missing.", ("component",), registry=registry)
    for comp in ("nvml", "dcgm_fields", "efa_sysfs", "node_exporter_port"):
        degraded.labels(comp).set(0)
    targets: list[Path] = []

    def external(kind: str, port: int) -> None:
        labels = {"run": run, "host": host, "slurm_job": slurm_job, "exporter": kind}
        targets.append(discovery.register(m, args.run_dir, run, "node", f"{host}-{kind}", f"{advertise}:{port}",
                                          labels))

    def degrade(component: str, message: str) -> None:
        degraded.labels(component).set(1)
        say(message)

    gpu_source, collectors = serve_gpu(m, c, host, args.run_dir, registry, external, degrade)
    efa_source = "none"
    if m.node_exporter == "auto" and probe(m.efa_exporter_port, "node_amazonefa_"):
        efa_source = "aws-efa-exporter"
        external("efa-exporter", m.efa_exporter_port)
    else:
        reader = EfaSysfs(m.efa_sysfs_dir)
        found = reader.devices()
        if found:
            registry.register(EfaCollector(reader))
            efa_source = "sysfs"
        if c.efa_devices > len(found):
            degraded.labels("efa_sysfs").set(1)
            say(f"{len(found)} of the {c.efa_devices} EFA devices the cluster config expects are under "
                f"{m.efa_sysfs_dir}: EFA metrics are incomplete, and NCCL may be using TCP sockets")
    Gauge(n.EFA_EXPECTED_DEVICES, "EFA devices the cluster config expects on this node.",
          registry=registry).set(c.efa_devices)
    Gauge(n.NODE_EXPORTER_INFO, "Where this node's GPU and EFA metrics come from.", ("gpu_source", "efa_source"),
          registry=registry).labels(gpu_source, efa_source).set(1)

    server: object = None
    try:
        server, port, problem = serve(registry, m.bind_address, m.port_base)
        if problem:
            degraded.labels("node_exporter_port").set(1)
            say(problem)
        targets.append(discovery.register(m, args.run_dir, run, "node", host, f"{advertise}:{port}",
                                          {"run": run, "host": host, "slurm_job": slurm_job,
                                           "exporter": "hyperlaunch-node"}))
        say(f"node exporter on port {port} (GPU: {gpu_source}, EFA: {efa_source})")
    except OSError as exc:
        say(f"cannot serve node metrics on any port ({exc}); this node's GPU/EFA metrics are not scraped")

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        if args.parent_pid is not None and not process_alive(args.parent_pid):
            break
    for path in targets:
        discovery.unregister(path)
    for collector in collectors:
        collector.close()
    if server is not None:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
