"""A real multi-node Slurm on this machine: one network namespace per node (tests, by hand).

Layout (``<sfx>`` = 6 random hex characters per run; every interface name fits in 15)::

    host   bridge hlm<sfx>br 10.213.<X>.1/24   munged (own key, socket in /tmp/hlm-munge-<sfx>-*)
                                               slurmctld -D -c  (SlurmctldHost=<hostname -s>(bridge addr))
    node1  netns hlm<sfx>-node1, veth eth0 10.213.<X>.11/24 <-> hlm<sfx>v1 on the bridge,
           own UTS hostname "node1", own mount namespace with this run's hosts file over /etc/hosts,
           slurmd -D -N node1
    node2  ... .12      node3  ... .13

``<X>`` is drawn at random among the /24s of 10.213.0.0/16 that overlap no address or route of the
host, under a file lock (``/tmp/hyperlaunch-multinode/lock``), so parallel runs never share a
subnet. Namespaces have no default route: only the project's own bridge and namespace addresses are
ever contacted. Job steps inherit their slurmd's namespaces, so inside a job ``hostname`` and
``socket.gethostname()`` give ``nodeN``, the node names resolve (through the run's hosts file) to
the namespace addresses, and gloo/TCPStore traffic crosses "nodes" over the bridge. Namespaces share
the filesystem, so any directory (``shared_dir``) is visible to every node, and one munged serves all.

Use (tests; the fixtures are imported by tests/multinode/conftest.py)::

    @pytest.mark.multinode
    @pytest.mark.timeout(240)
    def test_x(multinode: MultiNodeSlurm, tmp_path: Path) -> None:
        multinode.run("sbatch", "--nodes=2", script)            # Slurm CLIs against this cluster
        subprocess.run([...], env=multinode.client_env())        # os.environ + SLURM_CONF
        multinode.launcher("config=tiny_local", "cluster=slurm", "cluster.nodes=2", "cluster.gpu_type=cpu",
                           "cluster.gpus_per_node_flag=false", f"cluster.python={sys.executable}",
                           f"runs_root={tmp_path}")                # python -m launcher, submitting here
        multinode.kill_node("node2"); multinode.mark_node_down("node2"); multinode.release_job(job_id)
        multinode.restart_node("node2"); multinode.shape("node1", "10mbit"); multinode.unshape("node1")
        multinode.run_in_node("node1", ["hostname"]); multinode.popen_in_node("node1", argv)
        multinode.node_states(); multinode.job_fields(job_id); multinode.wait_until(pred, 60, "what")

Every path is visible on every node (``shared_dir``, pytest's ``tmp_path``, the repository), so the
launcher's run directory and checkpoints need nothing special. The session cluster starts on the
first test that asks for ``multinode`` (only tests marked ``multinode`` may) and is reset before
each test: jobs cancelled, links unshaped, killed nodes restarted, stray in-node processes killed,
all nodes idle. The rendered job.sbatch/step.sh of the project ran on it unchanged (DP=2 across
node[1-2], 10 tiny steps, COMPLETED in 31 s).

By hand: ``scripts/start_slurm.sh --nodes 3`` (prints the exports and the stop command),
``scripts/start_slurm.sh --stop STATE.json``; or ``python -m tests.multinode_cluster --help``.
Needs root, iproute2 (ip, tc), util-linux (nsenter, unshare), slurm-wlm and munge.

slurm.conf (see ``render_slurm_conf``; the values that differ from a production cluster):
- ``SlurmdTimeout=5 MessageTimeout=3 TCPTimeout=2 KillWait=2``: a killed node is DOWN in ~11 s;
- ``AuthInfo=...,cred_expire=10``: a requeued job becomes eligible at requeue + cred_expire + 1 s
  (the default 120 s would make it wait two minutes; ``scontrol reconfigure`` does not apply it);
- ``SchedulerParameters=bf_interval=1,sched_interval=2``: an eligible job is scheduled within ~2 s
  (eligibility arriving with time triggers no scheduling pass; defaults are 30/60 s);
- ``ReturnToService=2``: a restarted slurmd brings its node back to idle by itself;
- ``JobRequeue=1``, ``FirstJobId=1000`` (ids differ from the single-node test cluster's, which
  start at 1), ``JobCompType=jobcomp/filetxt`` (``sacct -c`` works, as on the single-node cluster),
  ``SlurmctldPort`` drawn from 17100-17999: outside the ephemeral range from which
  tests/slurm_cluster.py and the other test services take their ports (slurmctld binds INADDR_ANY);
  every slurmd uses 6818 inside its own namespace.

Timings measured here (2 cores, seconds after SIGKILL of every process of the batch host of a
running 2-node ``--requeue`` job; the higher values with two busy loops on the cores; the test
prints its own):
  cluster start 0.5-2.2 s, stop 0.9-3.5 s;
  Slurm's own detection: node ``*`` (not responding) 4.7-8.6, DOWN and requeued 10.4-14.0, job
  PENDING (BeginTime) 13.0-16.7, RUNNING on the two survivors 23.4-27.3 (``SLURM_RESTART_COUNT=1``);
  with the shortcut for tests that do not test detection -- ``mark_node_down(node)`` right after
  the kill, ``release_job(id)`` once PENDING (``StartTime=now`` skips the cred_expire wait): DOWN
  0.1, PENDING 2.7-2.8, RUNNING 3.2-3.8;
  a restarted slurmd is idle again after 0.2-1.5 s.

Pitfalls (each hit while building this):
- ``ip netns exec`` remounts /sys, which hides /sys/fs/cgroup: slurmd 22.05 then aborts ("Unable to
  initialize cgroup plugin"). Daemons and commands enter a node with ``nsenter --net=/run/netns/NS``.
- Without a UTS namespace jobs see the host's hostname (it resolves to 127.0.0.1): gloo binds to
  loopback and the rendezvous hangs. torch 2.13's c10d handler also calls
  ``getaddrinfo(gethostname())`` and workers connect to ``MASTER_ADDR`` = the head node's *name*,
  so every node name must resolve on every node: the per-run hosts file, bind-mounted over
  /etc/hosts in each node's private mount namespace (the real /etc/hosts is never touched).
  (Alternative for clusters without DNS names: ``scontrol show node`` -> NodeAddr and
  ``torchrun --local-addr``.)
- A requeued job does not start before requeue + cred_expire + 1 s, then waits for a scheduling
  pass: both set short above.
- Pinning a ``--requeue`` job with ``--nodelist`` keeps it PENDING (ReqNodeNotAvail) after its node
  died: let Slurm choose among the nodes.
- The requeued run truncates its ``--output`` file unless the job has ``--open-mode=append``.
- Namespace teardown is asynchronous: host veth ends outlive ``ip netns del`` while a process
  (or zombie) holds the namespace. Kill the namespace's PIDs first, delete the veths, then the
  namespaces; zombies count as dead (PID 1 here reaps lazily).
- The slurmd spool directory of each node (``%n``) must exist before slurmd starts.
- ``sbatch --wait`` polls the job with growing intervals (up to 10 s late here): poll
  ``scontrol show job`` yourself when the time matters.
- Slurm node names and the host's name: ``SlurmctldHost`` must be ``hostname -s`` of the host
  (slurmctld refuses to start otherwise); the address in parentheses is the bridge's.
- netem (delay/loss) and fq_codel are not in this kernel: slow links are ``tc ... tbf``; tbf shapes
  a device's egress only (``shape(..., both_directions=True)`` also shapes the bridge side).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.multinode_cleanup import (
    LINK_PREFIX,
    REGISTRY,
    CommandError,
    Daemon,
    kill_pid,
    leftovers,
    netns_pids,
    register_live,
    registry_lock,
    run_command,
    save_state,
    start_time_of,
    stop_from_state,
    sweep_stale,
    sweep_stale_locked,
    teardown,
    unregister_live,
)
from tests.slurm_cluster import INSTALL_HINT, find_binary

__all__ = ["MultiNodeConfig", "MultiNodeSlurm", "MultiNodeError", "leftovers", "multinode",
           "multinode_session", "netns_pids", "require_multinode", "stop_from_state", "sweep_stale"]

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol",
                     "scancel", "ip", "tc", "nsenter", "unshare", "mount", "hostname")
SUBNET_PREFIX = "10.213"  # per-run /24s are drawn from this /16
INNER_IFNAME = "eth0"  # the node side of each veth: the same name on every node
SLURMD_PORT = 6818  # inside each namespace: no clash possible
CTLD_PORTS = range(17100, 18000)  # below the ephemeral range the other test services draw from
FIRST_JOB_ID = 1000
PARTITION = "debug"


class MultiNodeError(CommandError):
    pass


@dataclass(kw_only=True, slots=True, frozen=True)
class MultiNodeConfig:
    nodes: int = 3
    """Number of slurmd nodes (1-50), named node1..nodeN."""
    cpus_per_node: int = 0
    """CPUs= of each node; 0 = this machine's CPU count (slurmd refuses more than it has)."""
    mem_per_node_mib: int = 2000
    slurmd_timeout_s: int = 5
    """SlurmdTimeout: with the ping cycle, a dead node is DOWN ~11 s after it died."""
    message_timeout_s: int = 3
    cred_expire_s: int = 10
    """A requeued job is eligible again cred_expire + 1 s after the requeue (Slurm's default: 120)."""
    start_timeout_s: float = 60.0
    """Until every node is idle."""


# ---- pure parts ----------------------------------------------------------------------------------

def render_slurm_conf(*, root: Path, ctld_host: str, ctld_addr: str, ctld_port: int, munge_socket: Path,
                      nodes: dict[str, str], config: MultiNodeConfig, cpus: int) -> str:
    node_lines = "\n".join(f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={cpus} "
                           f"RealMemory={config.mem_per_node_mib} State=UNKNOWN" for name, addr in nodes.items())
    return f"""\
ClusterName=mn
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={config.cred_expire_s}
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d/%n
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/state/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
EnforcePartLimits=ALL
FirstJobId={FIRST_JOB_ID}
ReturnToService=2
JobRequeue=1
MpiDefault=none
MinJobAge=300
KillWait=2
SlurmctldTimeout=10
SlurmdTimeout={config.slurmd_timeout_s}
MessageTimeout={config.message_timeout_s}
TCPTimeout=2
{node_lines}
PartitionName={PARTITION} Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def render_hosts(*, bridge_addr: str, host_names: Sequence[str], nodes: dict[str, str]) -> str:
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
             f"{bridge_addr} {' '.join(host_names)}", *(f"{addr} {name}" for name, addr in nodes.items())]
    return "\n".join(lines) + "\n"


def _pick_octet() -> int:
    """A third octet X such that 10.213.X.0/24 overlaps no address or route of the host."""
    text = (run_command(["ip", "-4", "route", "show", "table", "all"]).stdout
            + run_command(["ip", "-4", "-o", "addr"]).stdout)
    used = []
    for token in text.split():
        try:
            net = ipaddress.ip_network(token, strict=False)
        except ValueError:
            continue
        if net.prefixlen > 0:
            used.append(net)
    candidates = list(range(1, 255))
    secrets.SystemRandom().shuffle(candidates)
    for octet in candidates:
        net = ipaddress.ip_network(f"{SUBNET_PREFIX}.{octet}.0/24")
        if not any(net.overlaps(u) for u in used):
            return octet
    raise MultiNodeError(f"no free /24 in {SUBNET_PREFIX}.0.0/16")


def _pick_ctld_port() -> int:
    ports = list(CTLD_PORTS)
    secrets.SystemRandom().shuffle(ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))  # slurmctld binds INADDR_ANY
            except OSError:
                continue
            return port
    raise MultiNodeError(f"no free slurmctld port in {CTLD_PORTS}")


def missing_requirements() -> list[str]:
    missing = [name for name in REQUIRED_BINARIES if find_binary(name) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces, bridge, mounts)")
    return missing


# ---- the cluster ---------------------------------------------------------------------------------

class MultiNodeSlurm:
    """Bridge + one network namespace per node + munged + slurmctld + one slurmd per node."""

    def __init__(self, config: MultiNodeConfig | None = None, workdir: str | os.PathLike[str] | None = None) -> None:
        self.config = config or MultiNodeConfig()
        if not 1 <= self.config.nodes <= 50:
            raise ValueError(f"nodes={self.config.nodes}: must be 1..50")
        self.suffix = secrets.token_hex(3)
        self._own_root = workdir is None  # removed at stop; pass a workdir to keep the logs
        self.root = Path(workdir or tempfile.mkdtemp(prefix=f"hlm-slurm-{self.suffix}-")).resolve()
        self.conf_path = self.root / "slurm.conf"
        self.hosts_path = self.root / "hosts"
        self.shared_dir = self.root / "shared"
        self.log_dir = self.root / "log"
        self.bridge = f"{LINK_PREFIX}{self.suffix}br"
        self.node_names = [f"node{i}" for i in range(1, self.config.nodes + 1)]
        self.octet = 0
        self.ctld_port = 0
        self.munge_dir: Path | None = None
        self._procs: dict[str, Daemon] = {}
        self._namespaces: list[str] = []
        self._links: list[str] = []
        self.owner_pid = os.getpid()  # stops it at exit / on SIGTERM; swept as stale once this is gone
        self._owner_start_time = start_time_of(self.owner_pid)

    # names, addresses, environment
    def ns(self, node: str) -> str:
        return f"{LINK_PREFIX}{self.suffix}-{node}"

    def host_veth(self, node: str) -> str:
        return f"{LINK_PREFIX}{self.suffix}v{self._index(node)}"

    def _index(self, node: str) -> int:
        if node not in self.node_names:
            raise KeyError(f"{node!r} is not a node of this cluster ({', '.join(self.node_names)})")
        return int(node.removeprefix("node"))

    @property
    def bridge_addr(self) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.1"

    def addr(self, node: str) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.{10 + self._index(node)}"

    @property
    def state_path(self) -> Path:
        return REGISTRY / f"{self.suffix}.json"

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client needs; jobs inherit it (sbatch --export=ALL is the default)."""
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """``os.environ`` + ``env`` (+ ``extra``), for subprocesses that use this cluster."""
        return {**os.environ, **self.env, **(extra or {})}

    def run(self, *argv: str, timeout_s: float = 30.0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """A command (sbatch, squeue, scontrol ...) on the host against this cluster; never raises on rc."""
        return run_command(argv, timeout_s=timeout_s, check=False, env=self.client_env(env))

    def launcher(self, *args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
        """``python -m launcher ARGS`` from the repository root, submitting to this cluster."""
        return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s, env=self.client_env(env), check=False)

    # commands inside a node (the node's network, hostname and hosts file, like its jobs)
    def node_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        inner = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.ns(node)}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", inner, "sh", node, str(self.hosts_path), *argv]

    def run_in_node(self, node: str, argv: Sequence[str], *, timeout_s: float = 30.0,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_command(self.node_argv(node, argv), timeout_s=timeout_s, check=False, env=self.client_env(env))

    def popen_in_node(self, node: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                      **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; the caller waits for it. ``kill_node``/``reset``/``stop`` kill it too."""
        return subprocess.Popen(self.node_argv(node, argv), env=self.client_env(env), stdin=subprocess.DEVNULL,
                                **kwargs)

    # ---- start -----------------------------------------------------------------------------------
    def start(self) -> MultiNodeSlurm:
        missing = missing_requirements()
        if missing:
            raise MultiNodeError(f"cannot start a multi-node Slurm, missing: {', '.join(missing)} "
                                      f"(install with `{INSTALL_HINT}`)")
        register_live(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for sub in ("state/ctld", "shared", "log", "munge", *(f"state/d/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        with registry_lock():  # the subnet and the port stay ours once the bridge and slurmctld hold them
            sweep_stale_locked()
            self.octet = _pick_octet()
            self.ctld_port = _pick_ctld_port()
            self._save_state()  # before anything exists: from here on a crash is swept by the next start
            self._make_network()
            self._write_files()
            self._start_controller()
        for node in self.node_names:
            self._launch(f"slurmd:{node}", self._slurmd_argv(node))
        self._save_state()
        self.wait_until(lambda: self._all_idle(), self.config.start_timeout_s, "every node idle",
                        watch_daemons=True)

    def _make_network(self) -> None:
        self._links.append(self.bridge)
        run_command(["ip", "link", "add", self.bridge, "type", "bridge"])
        run_command(["ip", "addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge])
        run_command(["ip", "link", "set", self.bridge, "up"])
        for node in self.node_names:
            ns, veth = self.ns(node), self.host_veth(node)
            self._namespaces.append(ns)
            run_command(["ip", "netns", "add", ns])
            self._links.append(veth)
            run_command(["ip", "link", "add", veth, "type", "veth", "peer", "name", INNER_IFNAME, "netns", ns])
            run_command(["ip", "link", "set", veth, "master", self.bridge, "up"])
            run_command(["ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", INNER_IFNAME])
            run_command(["ip", "-n", ns, "link", "set", INNER_IFNAME, "up"])
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._save_state()

    def _write_files(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        # munged wants every directory above its socket traversable by all (pytest's tmp dirs are
        # 0700), and a short path keeps the socket under the unix-socket length limit
        self.munge_dir = Path(tempfile.mkdtemp(prefix=f"hlm-munge-{self.suffix}-", dir="/tmp"))
        self.munge_dir.chmod(0o755)
        self._save_state()
        nodes = {n: self.addr(n) for n in self.node_names}
        host = socket.gethostname().split(".")[0]
        cpus = self.config.cpus_per_node or os.cpu_count() or 1
        self.conf_path.write_text(render_slurm_conf(
            root=self.root, ctld_host=host, ctld_addr=self.bridge_addr, ctld_port=self.ctld_port,
            munge_socket=self.munge_dir / "munge.socket", nodes=nodes, config=self.config, cpus=cpus))
        self.hosts_path.write_text(render_hosts(bridge_addr=self.bridge_addr,
                                                host_names=[host, f"slurmctld-{self.suffix}"], nodes=nodes))

    def _start_controller(self) -> None:
        assert self.munge_dir is not None
        sock, m = self.munge_dir / "munge.socket", self.root / "munge"
        self._launch("munged", [_bin("munged"), "--foreground", f"--socket={sock}", f"--key-file={m / 'munge.key'}",
                                f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
                                f"--log-file={self.log_dir / 'munged.log'}"])
        self.wait_until(sock.exists, 10, "munged's socket", watch_daemons=True)
        self._launch("slurmctld", [_bin("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])
        self.wait_until(lambda: "UP" in self.run("scontrol", "ping", timeout_s=10).stdout, 20,
                        "slurmctld answering", watch_daemons=True)

    def _slurmd_argv(self, node: str) -> list[str]:
        return self.node_argv(node, [_bin("slurmd"), "-D", "-N", node, "-f", str(self.conf_path)])

    def _launch(self, name: str, argv: list[str]) -> Daemon:
        with open(self.log_dir / f"{name.replace(':', '.')}.out", "ab") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.client_env(), start_new_session=True)
        # nsenter, unshare and sh all exec: the PID stays the daemon's
        proc = Daemon(name, popen.pid, start_time_of(popen.pid), popen)
        self._procs[name] = proc
        return proc

    # ---- waiting and inspection -------------------------------------------------------------------
    def wait_until(self, ready: Callable[[], object], timeout_s: float, what: str, *,
                   watch_daemons: bool = False, interval_s: float = 0.2) -> Any:
        """Poll ``ready`` until truthy (returned); MultiNodeError with log tails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            if watch_daemons:
                dead = [p.name for p in self._procs.values() if not p.alive()]
                if dead:
                    raise MultiNodeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.log_tails()}")
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise MultiNodeError(f"no {what} within {timeout_s:.0f} s\n{self.log_tails()}")
            time.sleep(interval_s)

    def node_states(self) -> dict[str, str]:
        """Node -> sinfo state (``idle``, ``mixed``, ``allocated``, ``down*``, ``idle*`` ...)."""
        out = self.run("sinfo", "--Node", "--noheader", "--format=%N %T", timeout_s=10).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(self.node_names) and all(s == "idle" for s in states.values())

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol -o show job`` as a dict (JobState, NodeList, BatchHost, Restarts, Reason ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, timeout_s=10).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def slurmd_pid(self, node: str) -> int | None:
        proc = self._procs.get(f"slurmd:{node}")
        return proc.pid if proc is not None and proc.alive() else None

    def log_tails(self, lines: int = 20) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- faults ----------------------------------------------------------------------------------
    def kill_node(self, node: str, timeout_s: float = 15.0) -> list[int]:
        """SIGKILL slurmd and every process in the node's namespace, as a dead instance would; returns the PIDs."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout_s
        while pids := netns_pids(self.ns(node)):  # loop: a dying slurmstepd may still fork
            for pid in pids:
                kill_pid(pid, signal.SIGKILL)
            killed += [p for p in pids if p not in killed]
            if time.monotonic() > deadline:
                raise MultiNodeError(f"processes {pids} in {node} survive SIGKILL")
            time.sleep(0.05)
        proc = self._procs.get(f"slurmd:{node}")
        if proc is not None and proc.popen is not None:
            proc.popen.wait(timeout=timeout_s)  # reap
        return killed

    def restart_node(self, node: str, *, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Kill whatever is left in the node, start its slurmd again, resume it if an admin set it down."""
        self.kill_node(node)
        self._launch(f"slurmd:{node}", self._slurmd_argv(node))
        self._save_state()
        if not wait:
            return

        def back() -> bool:
            state = self.node_states().get(node, "")
            if state.startswith(("down", "drain")) and not state.endswith("*"):
                self.run("scontrol", "update", f"nodename={node}", "state=resume")
            return state == "idle"
        self.wait_until(back, timeout_s, f"{node} idle again")

    def mark_node_down(self, node: str, reason: str = "killed by test") -> None:
        """Skip SlurmdTimeout: set the node DOWN now (its --requeue jobs are requeued ~4 s later)."""
        self._check(self.run("scontrol", "update", f"nodename={node}", "state=down", f"reason={reason}"))

    def release_job(self, job_id: str) -> None:
        """Skip the cred_expire wait of a requeued job (``StartTime=now``)."""
        self._check(self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now"))

    def shape(self, node: str, rate: str = "10mbit", *, burst: str = "32kbit", latency: str = "400ms",
              both_directions: bool = False) -> None:
        """Token-bucket limit on the node's egress (and ingress with ``both_directions``); netem is not available."""
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        run_command(["nsenter", f"--net=/run/netns/{self.ns(node)}", "tc", "qdisc", "replace", "dev", INNER_IFNAME,
                     *tbf])
        if both_directions:
            run_command(["tc", "qdisc", "replace", "dev", self.host_veth(node), *tbf])

    def unshape(self, node: str) -> None:
        run_command(["nsenter", f"--net=/run/netns/{self.ns(node)}", "tc", "qdisc", "del", "dev", INNER_IFNAME,
                     "root"], check=False)
        run_command(["tc", "qdisc", "del", "dev", self.host_veth(node), "root"], check=False)

    def _check(self, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise MultiNodeError(f"{' '.join(result.args)}: {result.stderr.strip()}")

    # ---- between tests ---------------------------------------------------------------------------
    def cancel_all_jobs(self, timeout_s: float = 30.0) -> None:
        self.run("scancel", "--full", "--user=root")
        self.wait_until(lambda: not self.run("squeue", "--noheader", "--format=%i").stdout.strip(), timeout_s,
                        "empty queue")

    def reset(self, timeout_s: float = 60.0) -> None:
        """Back to a fresh cluster: no jobs, no shaping, no stray in-node processes, every node idle."""
        for node in self.node_names:  # first: a job on a dead node completes only once the node is back
            if self.slurmd_pid(node) is None:
                self.restart_node(node, wait=False)
        self.cancel_all_jobs(timeout_s)
        for node in self.node_names:
            self.unshape(node)
            slurmd = self.slurmd_pid(node)
            for pid in netns_pids(self.ns(node)):
                if pid != slurmd:
                    kill_pid(pid, signal.SIGKILL)

        def all_idle() -> bool:
            for node, state in self.node_states().items():
                if state.startswith(("down", "drain")) and not state.endswith("*"):
                    self.run("scontrol", "update", f"nodename={node}", "state=resume")
            return self._all_idle()
        self.wait_until(all_idle, timeout_s, "every node idle after reset")

    # ---- stop ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What ``teardown``/``leftovers`` need: processes, namespaces, links, files."""
        return {"root": str(self.root), "suffix": self.suffix, "bridge": self.bridge,
                "namespaces": list(self._namespaces), "links": list(self._links),
                "munge_dir": str(self.munge_dir) if self.munge_dir else None,
                "hosts": str(self.hosts_path), "conf": str(self.conf_path),
                "remove_root": self._own_root,
                "owner": {"pid": self.owner_pid, "start_time": self._owner_start_time},
                "procs": [p.to_json() for p in self._procs.values()]}

    def _save_state(self) -> None:
        save_state(self.state())

    def detach(self) -> Path:
        """Leave the cluster running after this process exits (CLI); returns the state file for ``--stop``."""
        ctld = self._procs["slurmctld"]
        self.owner_pid, self._owner_start_time = ctld.pid, ctld.start_time  # swept once slurmctld is gone
        for proc in self._procs.values():
            proc.popen = None
        self._save_state()
        unregister_live(self)
        return self.state_path

    def stop(self) -> list[str]:
        """Cancel jobs, stop every process by PID, remove namespaces, veths, bridge, hosts file and munge
        socket directory. Idempotent; returns what could not be removed (empty: clean)."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.alive():
            try:
                self.run("scancel", "--full", "--user=root", timeout_s=10)
            except subprocess.TimeoutExpired:
                pass
        problems = teardown(self.state())
        for proc in self._procs.values():
            if proc.popen is not None:
                proc.popen.poll()  # reap
        self._procs.clear()
        self._namespaces.clear()
        self._links.clear()
        self.munge_dir = None
        unregister_live(self)
        return problems

    def __enter__(self) -> MultiNodeSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bin(name: str) -> str:
    return find_binary(name) or name


# ---- pytest --------------------------------------------------------------------------------------

def require_multinode() -> None:
    """Skip when root or a tool is missing; fail instead when ``CI`` is set."""
    missing = missing_requirements()
    if not missing:
        return
    message = f"multi-node Slurm needs {', '.join(missing)} (install with `{INSTALL_HINT}`)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def multinode_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeSlurm]:
    """The session's 3-node cluster, started on first use; prefer ``multinode`` (reset per test)."""
    require_multinode()
    cluster = MultiNodeSlurm(MultiNodeConfig(nodes=3), tmp_path_factory.mktemp("multinode"))
    cluster.start()
    try:
        yield cluster
    finally:
        problems = cluster.stop()
        if problems:
            print(f"multinode teardown problems: {problems}", file=sys.stderr)


@pytest.fixture
def multinode(request: pytest.FixtureRequest) -> Iterator[MultiNodeSlurm]:
    """A running 3-node cluster in a fresh state (see ``MultiNodeSlurm.reset``); only for tests
    marked ``multinode``, so ``-m "not multinode"`` never starts it."""
    if request.node.get_closest_marker("multinode") is None:
        pytest.fail("the multinode fixture is only for tests marked @pytest.mark.multinode", pytrace=False)
    cluster: MultiNodeSlurm = request.getfixturevalue("multinode_session")
    cluster.reset()
    yield cluster
    cluster.run("scancel", "--full", "--user=root")  # no CPU burnt by this test's jobs after it; reset() does the rest


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.multinode_cluster",
                                     description="Start (or stop) a multi-node Slurm on this machine.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="state, logs, shared/ (default: a new /tmp dir, removed at stop)")
    parser.add_argument("--foreground", action="store_true", help="run until Ctrl-C / SIGTERM, then clean up")
    parser.add_argument("--stop", metavar="STATE_JSON", help="stop the cluster a start printed")
    args = parser.parse_args(argv)
    if args.stop:
        problems = stop_from_state(args.stop)
        print("stopped" if not problems else "\n".join(problems))
        return 1 if problems else 0
    cluster = MultiNodeSlurm(MultiNodeConfig(nodes=args.nodes), args.workdir)
    try:
        cluster.start()
    except (MultiNodeError, ValueError) as exc:  # start() has torn everything down
        print(f"start failed: {exc}", file=sys.stderr)
        return 1
    print(f"# multi-node Slurm up: {len(cluster.node_names)} nodes, bridge {cluster.bridge} "
          f"{cluster.bridge_addr}/24, partition {PARTITION}; in another shell:")
    print(f"export SLURM_CONF={cluster.conf_path}")
    for node in cluster.node_names:
        print(f"#   {node} {cluster.addr(node)}  shell: {shlex.join(cluster.node_argv(node, ['bash']))}")
    print(f"# shared directory (every node sees it): {cluster.shared_dir}\n# logs: {cluster.log_dir}")
    print(f"# state: {cluster.state_path}")
    if not args.foreground:
        state = cluster.detach()
        print(f"# stop: scripts/start_slurm.sh --stop {state}", flush=True)
        return 0
    print("# stop: Ctrl-C", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        problems = cluster.stop()
    print("stopped" if not problems else "\n".join(problems), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
