"""One rank of a preflight (started by srun on every node, one per GPU or one per CPU node).

Timeline of a rank, all within ``time_budget_s`` from its start:

1. the node's first rank runs the node's own checks (GPU: cluster.health_gpu; EFA: the device count
   of ``fi_info -p efa``, inside the container when the job has one) in a thread, and writes
   ``node-<node>.json``; a check still running after its share of the budget counts as failed;
2. every rank joins the bandwidth tests (cluster.health_net), appending results to ``rank-<r>.jsonl``;
3. rank 0 (the coordinator) waits for every node's file and every rank's ``done`` (or the end of
   the budget), decides (cluster.health_verdict), writes the report, event and quarantine file
   (cluster.health_report), prints the table, and exits 1 when a node failed.

A watchdog thread ends a rank stuck in a collective at the end of the budget; on rank 0 it first
writes the verdict from whatever arrived (a stalled link is a 0-bandwidth link; a node that
reported nothing fails).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from cluster.bandwidth import expected_bandwidth
from cluster.health_net import RankPlace
from cluster.health_records import (FAIL, AllSample, Endpoint, Finding, HealthSettings, LinkSample, Measurements,
                                    NodeReport, NodeSample, sample_from_dict)
from cluster.hostlist import expand_hostlist
from cluster.instances import efa_device_count_command

COORDINATOR_MARGIN_S = 3.0  # rank 0 decides this long before the budget ends
STRAGGLER_GRACE_S = 10.0  # other ranks give up this long after it


@dataclass(frozen=True)
class Outputs:
    """Where a preflight writes (a run's preflight directory, or the operator's --out)."""

    results_dir: Path  # node-*.json, rank-*.jsonl
    report: Path
    attempt: str
    events: Optional[Path] = None  # in a run: <run>/preflight/events.jsonl
    quarantine: Optional[Path] = None  # in a run: <run>/control/preflight_quarantine


# ---- the node's own checks -----------------------------------------------------------------------

def check_efa(expected: int, timeout_s: float = 30.0) -> tuple[str, list[Finding]]:
    """EFA devices libfabric sees, with the same command as the batch script's fallback check."""
    if expected <= 0:
        return "n/a", []
    script = ('export PATH="/opt/amazon/efa/bin:$PATH"; command -v fi_info >/dev/null || exit 127; '
              + efa_device_count_command())
    try:
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", [Finding("efa.devices", FAIL, f"fi_info did not answer within {timeout_s:.0f} s",
                                   figure="fi_info timeout")]
    if out.returncode == 127:
        return "no fi_info", [Finding("efa.software", FAIL, "fi_info not found: the EFA software (libfabric) is "
                                      "missing here (inside the container when the job has one)",
                                      figure="fi_info missing")]
    try:
        count = int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        count = 0
    status = f"{count}/{expected}"
    if count == 0:
        return status, [Finding("efa.software", FAIL, f"libfabric lists no EFA device (expected {expected}): the EFA "
                                "provider or the device is not available here; NCCL would fall back to TCP sockets",
                                figure=f"0/{expected} EFA devices")]
    if count < expected:
        return status, [Finding("efa.devices", FAIL, f"{count} of {expected} EFA devices: NCCL would lose bandwidth",
                                figure=f"{count}/{expected} EFA devices")]
    return status, []


def node_checks(settings: HealthSettings, node: str, timeout_s: float) -> NodeReport:
    started = time.time()
    findings: list[Finding] = []
    gpu_source = "n/a (gpu_type=cpu)"
    if settings.gpu:
        from cluster.health_gpu import check_gpus

        gpu_source, gpu_findings = check_gpus(settings.gpus_per_node, settings.gpu_diag_level, timeout_s)
        findings += gpu_findings
    efa, efa_findings = check_efa(settings.efa_devices)
    findings += efa_findings
    return NodeReport(node, socket.gethostname(), round(time.time() - started, 2), gpu_source, efa, tuple(findings))


# ---- where this rank is --------------------------------------------------------------------------

def node_address(node: str) -> str:
    """The node's name when it resolves, else Slurm's NodeAddr (names need not be DNS names); every rank asks,
    so slurmctld is only asked when the name does not resolve (scontrol may be absent in a container)."""
    try:
        socket.getaddrinfo(node, None)
        return node
    except OSError:
        pass
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "node", node, "-o"], capture_output=True, text=True, timeout=5)
            for token in out.stdout.split():
                if token.startswith("NodeAddr="):
                    return token.split("=", 1)[1]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return node


def rank_place(settings: HealthSettings, env: Optional[dict[str, str]] = None) -> RankPlace:
    """This rank's place from the Slurm step's environment (node-major ranks)."""
    env = dict(os.environ) if env is None else env
    nodes = tuple(expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or socket.gethostname()))
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    per_node = settings.ranks_per_node
    local = int(env.get("SLURM_LOCALID", "0"))
    index = nodes.index(node) if node in nodes else int(env.get("SLURM_NODEID", "0"))
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or len(nodes) * per_node)
    if tasks != len(nodes) * per_node:
        raise RuntimeError(f"the step has {tasks} tasks, the preflight needs {per_node} per node on {len(nodes)} "
                           f"nodes (srun --ntasks-per-node={per_node})")
    return RankPlace(rank=index * per_node + local, world=len(nodes) * per_node, local_rank=local,
                     ranks_per_node=per_node, nodes=nodes, master_addr=node_address(nodes[0]), port=settings.port)


# ---- collecting (rank 0) -------------------------------------------------------------------------

def read_results(results_dir: Path, nodes: tuple[str, ...], world: int
                 ) -> tuple[dict[str, NodeReport], Measurements]:
    reports: dict[str, NodeReport] = {}
    for node in nodes:
        try:
            reports[node] = NodeReport.from_dict(json.loads((results_dir / f"node-{node}.json").read_text()))
        except (OSError, ValueError, KeyError):
            continue
    m = Measurements()
    pending: dict[tuple[Endpoint, Endpoint], None] = {}
    for rank in range(world):
        try:
            lines = (results_dir / f"rank-{rank}.jsonl").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                data = json.loads(line)
            except ValueError:
                continue  # a line still being written
            kind = data.get("kind")
            if kind == "link_start":
                pending[(Endpoint(**data["src"]), Endpoint(**data["dst"]))] = None
            elif kind == "done":
                m.finished_ranks.add(rank)
            elif kind == "error":
                m.errors.append(f"rank {rank}: {data.get('message', '')}")
            else:
                sample = sample_from_dict(data)
                if isinstance(sample, LinkSample):
                    pending.pop((sample.src, sample.dst), None)
                    m.links.append(sample)
                elif isinstance(sample, NodeSample):
                    m.intra.append(sample)
                elif isinstance(sample, AllSample):
                    m.all_nodes = sample
    m.links += [LinkSample(src, dst, 0.0, 0, complete=False) for src, dst in pending]
    return reports, m


class Coordinator:
    def __init__(self, settings: HealthSettings, outputs: Outputs, nodes: tuple[str, ...], world: int,
                 started: float, say: Callable[[str], None]) -> None:
        self.settings, self.outputs, self.nodes, self.world = settings, outputs, nodes, world
        self.started, self.say = started, say
        self._lock = threading.Lock()
        self.code: Optional[int] = None

    def complete(self) -> bool:
        d = self.outputs.results_dir
        if not all((d / f"node-{n}.json").exists() for n in self.nodes):
            return False
        _, m = read_results(d, self.nodes, self.world)
        return len(m.finished_ranks) == self.world

    def finish(self, deadline: float) -> int:
        """Wait for every result (or the deadline), then decide and write everything; once."""
        while time.time() < deadline and not self.complete():
            time.sleep(0.5)
        with self._lock:
            if self.code is None:
                self.code = self._decide()
            return self.code

    def _decide(self) -> int:
        from cluster import health_report as out
        from cluster.health_net import link_verdict
        from cluster.health_verdict import decide

        s, o = self.settings, self.outputs
        reports, m = read_results(o.results_dir, self.nodes, self.world)
        expected = expected_bandwidth(instance_type=s.instance_type, gpu_type=s.gpu_type,
                                      ranks_per_node=s.ranks_per_node, override_gbps=s.expected_gbps)
        net = link_verdict(m, expected, s.min_bandwidth_fraction, s.ranks_per_node) if s.bandwidth_check else None
        previous = out.previous_quarantines(o.events) if o.events else 0
        verdict = decide(list(self.nodes), reports, net, s, previous_requeues=previous)
        report = out.report_dict(verdict, s, o.attempt, m, expected, self.started, time.time())
        out.write_report(o.report, report)
        if o.quarantine is not None:
            out.write_quarantine(o.quarantine, verdict)
        if o.events is not None:
            out.append_event(o.events, out.event_dict(report, s, str(o.report)))
        self.say(out.render_table(report))
        if s.pushgateway_url:
            problem = out.push_event(s.pushgateway_url, report, s)
            if problem:
                self.say(f"preflight: warning: {problem}")
        return verdict.exit_code


# ---- the rank's run ------------------------------------------------------------------------------

def run_rank(settings: HealthSettings, outputs: Outputs) -> int:
    """Everything one rank does; returns its exit status (only rank 0's carries the verdict)."""
    started = time.time()
    deadline = started + settings.time_budget_s

    def say(text: str) -> None:
        print(text, flush=True)

    place = rank_place(settings)
    outputs.results_dir.mkdir(parents=True, exist_ok=True)
    rank_file = open(outputs.results_dir / f"rank-{place.rank}.jsonl", "w")
    write_lock = threading.Lock()

    def record(data: dict[str, Any]) -> None:
        with write_lock:
            rank_file.write(json.dumps(data, sort_keys=True) + "\n")
            rank_file.flush()

    coordinator = (Coordinator(settings, outputs, place.nodes, place.world, started, say) if place.rank == 0
                   else None)
    _start_watchdog(coordinator, deadline)
    node_file = outputs.results_dir / f"node-{place.node}.json"
    if place.local_rank == 0:
        _node_checks_with_timeout(settings, place.node, node_file, deadline, say)
    else:  # no CUDA context of ours on the node's GPUs while dcgmi diag tests them
        while not node_file.exists() and time.time() < deadline - COORDINATOR_MARGIN_S:
            time.sleep(0.2)
    nnodes = len(place.nodes)
    try:
        if settings.bandwidth_check and (nnodes > 1 or place.ranks_per_node > 1):
            from cluster.health_net import measure

            try:
                measure(place, settings.gpu, deadline - COORDINATOR_MARGIN_S - 1.0, record)
            except Exception as exc:  # a peer that died, a rendezvous that never completed: the verdict says which
                first = (str(exc).splitlines() or [""])[0][:300]
                record({"kind": "error", "message": f"{type(exc).__name__}: {first}"})
        record({"kind": "done"})
        return coordinator.finish(deadline - COORDINATOR_MARGIN_S) if coordinator is not None else 0
    finally:
        rank_file.close()


def _node_checks_with_timeout(settings: HealthSettings, node: str, path: Path, deadline: float,
                              say: Callable[[str], None]) -> None:
    share = 0.5 if settings.bandwidth_check else 0.9
    timeout = max((deadline - time.time()) * share, 5.0)
    box: list[NodeReport] = []
    thread = threading.Thread(target=lambda: box.append(node_checks(settings, node, timeout)), daemon=True)
    thread.start()
    thread.join(timeout)
    if box:
        report = box[0]
    else:  # a hung driver call: the node is not usable, whatever the other checks would say
        report = NodeReport(node, socket.gethostname(), round(timeout, 1), "timeout", "-", (Finding(
            "node.timeout", FAIL, f"the node's checks did not finish within {timeout:.0f} s (a hung GPU or driver?)",
            figure=f"checks > {timeout:.0f} s"),))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), sort_keys=True))
    os.replace(tmp, path)
    bad = [f for f in report.findings if f.severity == FAIL]
    say(f"preflight: {node}: {'FAIL ' + '; '.join(f.message for f in bad) if bad else 'node checks passed'} "
        f"({report.gpu_source}; EFA {report.efa})")


def _start_watchdog(coordinator: Optional[Coordinator], deadline: float) -> None:
    """End a rank stuck in a collective: rank 0 decides first; the others leave a little later."""
    def watch() -> None:
        if coordinator is not None:
            time.sleep(max(deadline - COORDINATOR_MARGIN_S - time.time(), 0))
            code = coordinator.finish(time.time())
            sys.stdout.flush()
            time.sleep(1.0)  # the main thread may be finishing normally
            os._exit(code)
        time.sleep(max(deadline + STRAGGLER_GRACE_S - time.time(), 0))
        sys.stdout.flush()
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="preflight-watchdog").start()
