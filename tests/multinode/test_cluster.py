"""The multi-node test Slurm itself (tests/multinode_cluster.py): nodes with their own names and
addresses, 2-node jobs, gloo across nodes through a c10d rendezvous, node loss -> DOWN -> requeue on
the survivors, tbf link shaping, and cleanup (also after a failure, SIGTERM or SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import multinode_cluster
from tests.multinode_cluster import (
    ROOT,
    MultiNodeConfig,
    MultiNodeSlurm,
    leftovers,
    netns_pids,
    render_hosts,
    render_slurm_conf,
    require_multinode,
    sweep_stale,
)

WORKER = Path(__file__).with_name("allreduce_worker.py")


# ---- tier 1: the rendered files and the skip rule (no root, no daemons) --------------------------

def test_slurm_conf_has_the_short_failure_timings_and_one_line_per_node() -> None:
    nodes = {"node1": "10.213.7.11", "node2": "10.213.7.12"}
    conf = render_slurm_conf(root=Path("/w"), ctld_host="vm", ctld_addr="10.213.7.1", ctld_port=17123,
                             munge_socket=Path("/tmp/m/s"), nodes=nodes, config=MultiNodeConfig(), cpus=2)
    lines = conf.splitlines()
    assert "SlurmctldHost=vm(10.213.7.1)" in lines and "SlurmctldPort=17123" in lines
    assert "AuthInfo=socket=/tmp/m/s,cred_expire=10" in lines
    for required in ("SlurmdTimeout=5", "MessageTimeout=3", "ReturnToService=2", "JobRequeue=1",
                     "SchedulerParameters=bf_interval=1,sched_interval=2", "SlurmdSpoolDir=/w/state/d/%n",
                     "JobCompType=jobcomp/filetxt", "FirstJobId=1000"):
        assert required in lines
    assert "NodeName=node2 NodeAddr=10.213.7.12 NodeHostname=node2 CPUs=2 RealMemory=2000 State=UNKNOWN" in lines
    assert "PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP" in lines
    assert 17100 <= min(multinode_cluster.CTLD_PORTS) and max(multinode_cluster.CTLD_PORTS) < 32768


def test_hosts_file_maps_every_node_name_to_its_namespace_address() -> None:
    text = render_hosts(bridge_addr="10.213.7.1", host_names=["vm", "slurmctld-abc"],
                        nodes={"node1": "10.213.7.11", "node2": "10.213.7.12"})
    assert text.splitlines()[2:] == ["10.213.7.1 vm slurmctld-abc", "10.213.7.11 node1", "10.213.7.12 node2"]


def test_interface_names_fit_the_kernel_limit() -> None:
    cluster = MultiNodeSlurm(MultiNodeConfig(nodes=50), workdir="/nonexistent")
    names = [cluster.bridge, *(cluster.host_veth(n) for n in cluster.node_names)]
    assert max(len(n) for n in names) <= 15 and len(set(names)) == 51
    assert MultiNodeSlurm(workdir="/nonexistent").suffix != cluster.suffix


def test_require_multinode_skips_without_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multinode_cluster, "missing_requirements", lambda: ["nsenter"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs nsenter"):
        require_multinode()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set but multi-node Slurm needs nsenter"):
        require_multinode()


# ---- tier 2: the real cluster --------------------------------------------------------------------

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _sbatch(cluster: MultiNodeSlurm, script: str, *options: str, name: str, wait_s: float | None = None
            ) -> tuple[str, Path]:
    """Submit ``script`` (written to the shared directory); with ``wait_s`` poll until it ends
    (``sbatch --wait`` polls every 10 s at most, which would add up to 10 s per job)."""
    path = cluster.shared_dir / f"{name}.sh"
    path.write_text("#!/bin/bash\nset -uo pipefail\n" + script)
    out = cluster.shared_dir / f"{name}-%j.out"
    result = cluster.run("sbatch", "--parsable", f"--output={out}", f"--chdir={cluster.shared_dir}", *options,
                         str(path))
    assert result.returncode == 0, f"{result.stderr}\n{cluster.log_tails()}"
    job_id = result.stdout.strip().split(";")[0]
    if wait_s is not None:
        cluster.wait_until(lambda: cluster.job_fields(job_id).get("JobState") in TERMINAL, wait_s,
                           f"the end of job {job_id}", interval_s=0.25)
    return job_id, Path(str(out).replace("%j", job_id))


def _netns_inode(ns: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


@pytest.mark.multinode
@pytest.mark.timeout(60)
def test_three_nodes_with_their_own_hostnames_and_addresses(multinode: MultiNodeSlurm) -> None:
    assert multinode.node_states() == {"node1": "idle", "node2": "idle", "node3": "idle"}
    nodes = multinode.node_names
    probe = ("import json, os, socket; h = socket.gethostname(); print(json.dumps({'host': h, "
             "'addr': socket.gethostbyname(h), 'netns': os.readlink('/proc/self/ns/net'), "
             f"'others': {{n: socket.gethostbyname(n) for n in {nodes!r}}}}}))")
    seen = {}
    for node in nodes:
        show = multinode.run("scontrol", "show", "node", node).stdout
        assert f"NodeAddr={multinode.addr(node)} " in show
        result = multinode.run_in_node(node, [sys.executable, "-c", probe])
        assert result.returncode == 0, result.stderr
        seen[node] = json.loads(result.stdout)
        assert seen[node]["host"] == node
        assert seen[node]["addr"] == multinode.addr(node)
        assert seen[node]["netns"] == _netns_inode(multinode.ns(node))
        assert seen[node]["others"] == {n: multinode.addr(n) for n in nodes}
    assert len({s["addr"] for s in seen.values()}) == 3 and len({s["netns"] for s in seen.values()}) == 3


@pytest.mark.multinode
@pytest.mark.timeout(90)
def test_two_node_job_runs_one_task_per_node_in_different_namespaces(multinode: MultiNodeSlurm) -> None:
    script = ('srun --ntasks-per-node=1 bash -c \'echo "task=$SLURM_PROCID host=$(hostname) '
              'netns=$(readlink /proc/self/ns/net) addr=$(getent hosts "$(hostname)" | cut -d" " -f1)"\'\n')
    job_id, out = _sbatch(multinode, script, "--nodes=2", "--ntasks-per-node=1", "--exclusive", name="tasks",
                          wait_s=60)
    tasks = re.findall(r"task=(\d) host=(\S+) netns=(\S+) addr=(\S+)", out.read_text())
    assert sorted(t[0] for t in tasks) == ["0", "1"], out.read_text()
    assert len({t[1] for t in tasks}) == 2
    for _, host, netns, addr in tasks:
        assert netns == _netns_inode(multinode.ns(host)) and addr == multinode.addr(host)
    assert multinode.job_fields(job_id)["JobState"] == "COMPLETED"


@pytest.mark.multinode
@pytest.mark.timeout(180)
def test_gloo_all_reduce_across_two_nodes_through_c10d_rendezvous(multinode: MultiNodeSlurm) -> None:
    """The shape of the project's step.sh: one torchrun per node, head = first node of the step."""
    step = multinode.shared_dir / "step.sh"
    step.write_text(
        "#!/bin/bash\nset -euo pipefail\n"
        'head=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n1)\n'
        f'exec {sys.executable} -m torch.distributed.run --nnodes="$SLURM_STEP_NUM_NODES" --nproc-per-node=1 '
        '--rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head:29511" --max-restarts=0 '
        f"{WORKER}\n")
    script = f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash {step}\n"
    job_id, out = _sbatch(multinode, script, "--nodes=2", "--ntasks-per-node=1", "--exclusive", name="gloo",
                          wait_s=150)
    text = out.read_text()
    ranks = {r["rank"]: r for r in (json.loads(line) for line in text.splitlines() if line.startswith("{"))}
    assert sorted(ranks) == [0, 1], text
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in ranks.values())
    hosts = {r["host"] for r in ranks.values()}
    assert len(hosts) == 2 and all(r["addr"] == multinode.addr(r["host"]) for r in ranks.values())
    node_addrs = {multinode.addr(n) for n in multinode.node_names}
    for rank, other in ((0, 1), (1, 0)):
        remote = {a for a in ranks[rank]["remote"] if not a.startswith("127.") and a != "::1"}
        assert remote <= node_addrs, remote  # nothing but the namespace addresses
        assert ranks[other]["addr"] in remote  # gloo crossed from one node to the other
    assert multinode.job_fields(job_id)["JobState"] == "COMPLETED"


@pytest.mark.multinode
@pytest.mark.timeout(180)
def test_killed_node_goes_down_and_requeued_job_restarts_on_the_survivors(multinode: MultiNodeSlurm) -> None:
    """SIGKILL every process of the batch host (the hardest case: the batch script dies with it);
    Slurm's own detection (SlurmdTimeout), no shortcut. Prints the timings."""
    script = ('echo "batch host=$(hostname) restart=${SLURM_RESTART_COUNT:-0}"\n'
              'srun --ntasks-per-node=1 bash -c \'echo "task host=$(hostname) restart=${SLURM_RESTART_COUNT:-0}"; '
              "exec sleep 600'\n")
    job_id, out = _sbatch(multinode, script, "--nodes=2", "--ntasks-per-node=1", "--exclusive", "--requeue",
                          "--open-mode=append", "--time=10", name="loss")

    def tasks(restart: int) -> set[str]:
        text = out.read_text() if out.exists() else ""
        return set(re.findall(rf"task host=(\S+) restart={restart}\n", text))

    first = multinode.wait_until(lambda: len(tasks(0)) == 2 and tasks(0), 60, "both tasks running")
    victim = multinode.job_fields(job_id)["BatchHost"]
    assert victim in first
    t0 = time.monotonic()
    killed = multinode.kill_node(victim)
    assert killed and netns_pids(multinode.ns(victim)) == []
    events: dict[str, float] = {}

    def progress() -> bool:
        now = time.monotonic() - t0
        state = multinode.node_states().get(victim, "")
        job = multinode.job_fields(job_id)
        if state.endswith("*"):
            events.setdefault("not_responding", now)
        if state.startswith("down"):
            events.setdefault("down", now)
        if job.get("JobState") == "PENDING":
            events.setdefault("pending", now)
        if job.get("JobState") == "RUNNING" and "pending" in events:
            events.setdefault("running", now)
        if len(tasks(1)) == 2:
            events.setdefault("tasks_running", now)
        return "tasks_running" in events
    multinode.wait_until(progress, 120, "the requeued job's tasks on the survivors", interval_s=0.25)
    survivors = set(multinode.node_names) - {victim}
    assert tasks(1) == survivors
    job = multinode.job_fields(job_id)
    assert job["Restarts"] == "1" and job["JobState"] == "RUNNING"
    assert set(multinode.run("scontrol", "show", "hostnames", job["NodeList"]).stdout.split()) == survivors
    assert "restart=1" in out.read_text() and "restart=0" in out.read_text()  # --open-mode=append kept both
    assert multinode.node_states()[victim].startswith("down")
    assert set(events) >= {"down", "pending", "running"}
    assert events["down"] <= events["pending"] <= events["running"]
    t1 = time.monotonic()
    multinode.restart_node(victim)
    events["restarted_node_idle"] = time.monotonic() - t1
    print(f"node loss timings (s after the kill of {victim}): "
          + ", ".join(f"{k}={v:.1f}" for k, v in events.items()))


def _throughput_mbit(cluster: MultiNodeSlurm, sender: str, receiver: str, nbytes: int) -> float:
    """Plain TCP from ``sender`` to ``receiver``'s address, timed at the receiver."""
    server_code = (
        "import socket, sys, time\n"
        f"s = socket.create_server(({cluster.addr(receiver)!r}, 5201))\n"
        "print('listening', flush=True)\n"
        "c, _ = s.accept(); n = len(c.recv(65536)); t = time.perf_counter()\n"
        "while (b := c.recv(1 << 20)):\n    n += len(b)\n"
        "print(n, time.perf_counter() - t, flush=True)\n")
    client_code = (f"import socket; c = socket.create_connection(({cluster.addr(receiver)!r}, 5201), timeout=60); "
                   f"c.sendall(b'x' * {nbytes}); c.close()")
    server = cluster.popen_in_node(receiver, [sys.executable, "-c", server_code], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = cluster.run_in_node(sender, [sys.executable, "-c", client_code], timeout_s=60)
        assert client.returncode == 0, client.stderr
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait(timeout=10)
    received, seconds = out.split()
    assert int(received) == nbytes
    return nbytes * 8 / float(seconds) / 1e6


@pytest.mark.multinode
@pytest.mark.timeout(90)
def test_tbf_on_a_node_link_lowers_its_bandwidth(multinode: MultiNodeSlurm) -> None:
    free = _throughput_mbit(multinode, "node2", "node1", 16 << 20)
    multinode.shape("node2", "8mbit")
    shaped = _throughput_mbit(multinode, "node2", "node1", 1 << 20)
    reverse = _throughput_mbit(multinode, "node1", "node2", 4 << 20)  # tbf shapes node2's egress only
    multinode.unshape("node2")
    print(f"node2 -> node1: {free:.0f} Mbit/s unshaped, {shaped:.1f} Mbit/s with tbf 8mbit; "
          f"node1 -> node2 {reverse:.0f} Mbit/s")
    assert 4 < shaped < 11
    assert free > 10 * shaped and reverse > 10 * shaped


def _host_etc_hosts() -> bytes:
    return Path("/etc/hosts").read_bytes()


@pytest.mark.multinode
@pytest.mark.timeout(90)
def test_everything_is_removed_after_a_failure_inside_the_cluster(tmp_path: Path) -> None:
    require_multinode()
    etc_hosts = _host_etc_hosts()
    cluster = MultiNodeSlurm(MultiNodeConfig(nodes=2), tmp_path / "c")
    with pytest.raises(RuntimeError, match="a failing test"):
        with cluster:
            job_id, _ = _sbatch(cluster, "srun sleep 600\n", "--nodes=2", name="busy")
            cluster.wait_until(lambda: cluster.job_fields(job_id).get("JobState") == "RUNNING", 30, "job running")
            stray = cluster.popen_in_node("node1", ["sleep", "600"])
            cluster.shape("node2", "10mbit", both_directions=True)
            state = cluster.state()

            def in_nodes() -> list[int]:
                return [pid for node in cluster.node_names for pid in netns_pids(cluster.ns(node))]
            # 2 slurmd, the stray sleep, and on both nodes the job's slurmstepd and sleep (+ batch, srun)
            pids = cluster.wait_until(lambda: len(in_nodes()) >= 7 and in_nodes(), 30, "the job's processes")
            assert cluster.hosts_path.exists()
            raise RuntimeError("a failing test")
    stray.wait(timeout=10)
    assert leftovers(state) == []
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in pids)
    assert _host_etc_hosts() == etc_hosts
    assert cluster.stop() == []  # idempotent


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _start_cli(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_cluster", "--nodes", "2", "--foreground",
                             "--workdir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lines and lines[-1].startswith("# stop")):
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    state_line = next((line for line in lines if line.startswith("# state: ")), None)
    assert state_line is not None, lines
    assert any(line.startswith("export SLURM_CONF=") for line in lines)
    return proc, json.loads(Path(state_line.removeprefix("# state: ")).read_text())


@pytest.mark.multinode
@pytest.mark.timeout(120)
def test_cli_cleans_up_on_sigterm_and_a_killed_owner_is_swept(tmp_path: Path) -> None:
    require_multinode()
    proc, state = _start_cli(tmp_path / "term")
    try:
        assert leftovers(state)  # it is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert leftovers(state) == []

    proc, state = _start_cli(tmp_path / "kill")
    proc.kill()  # no chance to clean up: daemons, namespaces and bridge stay behind
    proc.wait(timeout=10)
    assert leftovers(state)
    assert state["suffix"] in sweep_stale()
    assert leftovers(state) == []
