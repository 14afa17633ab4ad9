"""Stopping the multi-node test Slurm (tests/multinode_cluster.py) by PID and removing what it
created -- also after a failed test, SIGTERM/SIGHUP, or a crash of the process that started it.

Every cluster keeps a state file ``/tmp/hyperlaunch-multinode/<suffix>.json`` (its processes with
their start times, namespaces, links, files, and its owner process), rewritten whenever that
changes. ``teardown(state)`` works from that file alone, so three paths lead to the same cleanup:
``MultiNodeSlurm.stop()`` (``finally``, ``with``, the fixture), the atexit and SIGTERM/SIGHUP
handlers installed here, and ``sweep_stale()`` -- run by every cluster start under the registry
lock -- for clusters whose owner died without cleaning up (SIGKILL, a pytest-timeout ``os._exit``).
Processes are identified by PID *and* start time, so a reused PID is never signalled; zombies
count as dead (PID 1 here reaps lazily).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

REGISTRY = Path("/tmp/hyperlaunch-multinode")  # lock + one state file per live cluster
LINK_PREFIX = "hlm"  # every namespace, bridge and veth of a cluster starts with hlm<suffix>


class CommandError(RuntimeError):
    pass


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time_of(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells one incarnation of a PID from the next."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def pid_alive(pid: int, start_time: str | None) -> bool:
    """Running, not a zombie, and the same incarnation (guards against PID reuse; unknown = dead)."""
    fields = _stat_fields(pid)
    return start_time is not None and fields is not None and fields[0] != "Z" and fields[19] == start_time


def kill_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Daemon:
    """A process started by a cluster, by PID and start time; ``popen`` while it is our child."""

    name: str
    pid: int
    start_time: str | None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return pid_alive(self.pid, self.start_time)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only this PID incarnation."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                return
            kill_pid(self.pid, sig)
            deadline = time.monotonic() + grace_s
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time}


def run_command(argv: Sequence[str], *, timeout_s: float = 30.0, check: bool = True,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if check and result.returncode != 0:
        raise CommandError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_pids(ns: str) -> list[int]:
    """PIDs of the processes in network namespace ``ns`` (zombies are not listed)."""
    out = run_command(["ip", "netns", "pids", ns], check=False, timeout_s=10).stdout
    return [int(p) for p in out.split()]


def teardown(state: dict[str, Any]) -> list[str]:
    """Stop everything a (possibly crashed) cluster started, by PID, and remove what it created."""
    problems: list[str] = []
    procs = [Daemon(p["name"], p["pid"], p["start_time"]) for p in state["procs"]]
    for proc in procs:  # 1. slurmds, then everything else in the namespaces (job steps, torchrun, ranks)
        if proc.name.startswith("slurmd:"):
            proc.stop(grace_s=3)
    for ns in state["namespaces"]:
        for pid in netns_pids(ns):
            kill_pid(pid, signal.SIGKILL)
    for name in ("slurmctld", "munged"):  # 2. the controller, then munge
        for proc in procs:
            if proc.name == name:
                proc.stop()
    for ns in state["namespaces"]:  # 3. the network: veths (each takes its peer), namespaces, bridge
        deadline = time.monotonic() + 10
        while (pids := netns_pids(ns)) and time.monotonic() < deadline:
            for pid in pids:
                kill_pid(pid, signal.SIGKILL)
            time.sleep(0.1)
    existing = existing_links()
    for link in reversed(state["links"]):
        if link in existing:
            result = run_command(["ip", "link", "del", link], check=False)
            if result.returncode != 0 and "Cannot find" not in result.stderr:
                problems.append(f"ip link del {link}: {result.stderr.strip()}")
    existing_ns = set(run_command(["ip", "netns", "list"], check=False).stdout.split())
    for ns in state["namespaces"]:
        if ns in existing_ns:
            result = run_command(["ip", "netns", "del", ns], check=False)
            if result.returncode != 0:
                problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
    if state.get("munge_dir"):
        shutil.rmtree(state["munge_dir"], ignore_errors=True)
    Path(state["hosts"]).unlink(missing_ok=True)
    problems += [f"{p.name} (pid {p.pid}) still alive" for p in procs if p.alive()]
    if not problems:
        (REGISTRY / f"{state['suffix']}.json").unlink(missing_ok=True)
        if state.get("remove_root"):  # a directory the cluster made itself (no workdir given)
            shutil.rmtree(state["root"], ignore_errors=True)
    return problems


def existing_links() -> set[str]:
    out = run_command(["ip", "-o", "link", "show"], check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2}


def leftovers(state: dict[str, Any]) -> list[str]:
    """What of a cluster (its state dict) still exists: processes, namespaces, links, files."""
    found = [f"process {p['name']} pid {p['pid']}" for p in state["procs"] if pid_alive(p["pid"], p["start_time"])]
    netns = set(run_command(["ip", "netns", "list"], check=False).stdout.split())
    found += [f"netns {ns}" for ns in state["namespaces"] if ns in netns]
    links = existing_links()
    found += [f"link {link}" for link in state["links"] if link in links]
    found += [f"link {link}" for link in links if link.startswith(f"{LINK_PREFIX}{state['suffix']}")
              and link not in state["links"]]
    for key in ("hosts", "munge_dir"):
        if state.get(key) and Path(state[key]).exists():
            found.append(f"{key} {state[key]}")
    state_file = REGISTRY / f"{state['suffix']}.json"
    if state_file.exists():
        found.append(f"state file {state_file}")
    return found


@contextmanager
def registry_lock() -> Iterator[None]:
    """Held while a cluster picks its subnet and port, and while stale clusters are swept."""
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sweep_stale() -> list[str]:
    """Tear down clusters whose owner process is gone (a killed pytest, a crashed CLI); their suffixes."""
    with registry_lock():
        return sweep_stale_locked()


def sweep_stale_locked() -> list[str]:
    swept = []
    for path in sorted(REGISTRY.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        owner = state.get("owner", {})
        if not pid_alive(owner.get("pid", -1), owner.get("start_time")):
            teardown(state)
            swept.append(state["suffix"])
    return swept


def stop_from_state(path: str | os.PathLike[str]) -> list[str]:
    """Stop a cluster from its state file (``--stop``): cancel its jobs, then ``teardown``."""
    state = json.loads(Path(path).read_text())
    ctld = next((p for p in state["procs"] if p["name"] == "slurmctld"), None)
    if ctld is not None and pid_alive(ctld["pid"], ctld["start_time"]):
        try:
            run_command(["scancel", "--full", "--user=root"], check=False, timeout_s=10,
                        env={**os.environ, "SLURM_CONF": state["conf"]})
        except subprocess.TimeoutExpired:
            pass
    return teardown(state)


def save_state(state: dict[str, Any]) -> Path:
    """Write a cluster's state file atomically; returns its path."""
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    path = REGISTRY / f"{state['suffix']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)
    return path


# ---- cleanup on exit and on SIGTERM/SIGHUP -------------------------------------------------------

class Stoppable(Protocol):
    owner_pid: int

    def stop(self) -> list[str]: ...


_LIVE: dict[int, Stoppable] = {}
_HANDLERS_INSTALLED = False


def register_live(cluster: Stoppable) -> None:
    """Stop ``cluster`` at interpreter exit and on SIGTERM/SIGHUP (then die of the signal as before)."""
    global _HANDLERS_INSTALLED
    _LIVE[id(cluster)] = cluster
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_stop_live)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)
            if previous is not signal.SIG_IGN:  # under nohup a SIGHUP must not stop the cluster
                signal.signal(sig, _make_handler(previous))


def unregister_live(cluster: Stoppable) -> None:
    _LIVE.pop(id(cluster), None)


def _stop_live() -> None:
    for cluster in list(_LIVE.values()):
        if cluster.owner_pid == os.getpid():  # not in a forked child
            cluster.stop()


def _make_handler(previous: Any) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        _stop_live()
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        os.kill(os.getpid(), signum)
    return handler
