"""A real single-node Slurm (slurmctld + slurmd + munged) for integration tests.

``start_slurm(workdir)`` writes a slurm.conf for this machine, starts its own munged
(own key under ``workdir``, own socket in a fresh ``/tmp/slurm-test-munge-*`` directory,
so it neither needs nor touches /etc/munge or /run/munge), slurmctld and slurmd in the
foreground as children, waits until the node is idle, and returns a ``SlurmHandle``;
``handle.stop()`` (or leaving the ``with`` block) stops them by PID. Ports are picked free
at start, so several clusters (parallel test sessions) can run on one machine.

Installing the daemons is the test runner's job:
``apt-get install -y --no-install-recommends slurm-wlm munge`` (Debian 12: Slurm 22.05).

The config follows the verified reference slurm.conf for this kind of machine, plus:
- ``EnforcePartLimits=ALL`` so impossible requests are refused at sbatch time (as on most
  production clusters) instead of pending forever;
- a second partition ``short`` (MaxTime 10 min) to exercise time-limit refusals.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "sacct")
INSTALL_HINT = "apt-get install -y --no-install-recommends slurm-wlm munge"
DEFAULT_PARTITION = "debug"
SHORT_PARTITION = "short"
SHORT_PARTITION_MAX_TIME = "00:10:00"
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class SlurmNotInstalled(RuntimeError):
    pass


class SlurmStartError(RuntimeError):
    pass


def find_binary(name: str) -> str | None:
    """``shutil.which`` plus the sbin directories a non-login PATH may lack."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_binaries() -> list[str]:
    return [name for name in REQUIRED_BINARIES if find_binary(name) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _total_memory_mib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmStartError("cannot read MemTotal from /proc/meminfo")


def render_slurm_conf(root: Path, *, hostname: str, cpus: int, real_memory_mib: int, ctld_port: int,
                      slurmd_port: int, munge_socket: Path) -> str:
    """slurm.conf for one node named like this host (slurmd insists on that)."""
    return f"""\
ClusterName=ci
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d
SlurmctldPidFile={root}/state/slurmctld.pid
SlurmdPidFile={root}/state/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
MinJobAge=300
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mib} State=UNKNOWN
PartitionName={DEFAULT_PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
PartitionName={SHORT_PARTITION} Nodes={hostname} MaxTime={SHORT_PARTITION_MAX_TIME} State=UP
"""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(missing)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; only this PID."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass


@dataclass
class SlurmHandle:
    """A running test cluster. ``env`` holds what a client needs (``SLURM_CONF``)."""

    workdir: Path
    conf_path: Path
    hostname: str
    cpus: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    munge_socket_dir: Path | None = None
    default_partition: str = DEFAULT_PARTITION
    short_partition: str = SHORT_PARTITION

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self) -> dict[str, str]:
        """``os.environ`` plus ``env``, for subprocesses that call Slurm commands."""
        return {**os.environ, **self.env}

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    @property
    def jobcomp_path(self) -> Path:
        return self.log_dir / "jobcomp.txt"

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            parts.append(f"--- {self.log_dir / name} (last {lines} lines) ---\n{_tail(self.log_dir / name, lines)}")
        return "\n".join(parts)

    def run(self, *argv: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster (for test set-up, not for code under test)."""
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.client_env(),
                              timeout=timeout_s, check=False)

    def cancel_all_jobs(self, wait_s: float = 10.0) -> None:
        self.run("scancel", f"--user={getpass.getuser()}")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            out = self.run("squeue", "--noheader", "--format=%i").stdout.strip()
            if not out:
                return
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld, munged by PID."""
        if not self.processes:
            self._remove_socket_dir()
            return
        if all(self.processes[n].poll() is None for n in ("slurmctld", "slurmd") if n in self.processes):
            try:
                self.cancel_all_jobs()
            except (OSError, subprocess.SubprocessError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                _stop_process(proc)
        self.processes.clear()
        self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self.munge_socket_dir is not None:
            shutil.rmtree(self.munge_socket_dir, ignore_errors=True)
            self.munge_socket_dir = None

    def __enter__(self) -> SlurmHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_slurm(workdir: str | os.PathLike[str], *, timeout_s: float = 30.0) -> SlurmHandle:
    """Start munged, slurmctld and slurmd under ``workdir``; return once the node is idle.

    Raises ``SlurmNotInstalled`` if a daemon or client is missing and ``SlurmStartError``
    (with the daemons' log tails) if the node does not come up within ``timeout_s``.
    """
    missing = missing_binaries()
    if missing:
        raise SlurmNotInstalled(f"Slurm/munge not installed (missing: {', '.join(missing)}); "
                                f"install with `{INSTALL_HINT}`")
    root = Path(workdir).resolve()
    for sub in ("state/ctld", "state/d", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    (root / "log" / "jobcomp.txt").unlink(missing_ok=True)  # ids restart at 1 with -c below

    munge_key = root / "munge" / "munge.key"
    if not munge_key.exists():
        munge_key.write_bytes(os.urandom(128))
    munge_key.chmod(0o600)
    # munged insists that every directory above its socket is traversable by all, which
    # pytest's 0700 temp dirs are not; a short-named directory in /tmp also keeps the
    # socket path under the unix-socket length limit.
    socket_dir = Path(tempfile.mkdtemp(prefix="slurm-test-munge-", dir="/tmp"))
    socket_dir.chmod(0o755)
    munge_socket = socket_dir / "munge.socket"

    hostname = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf_path = root / "slurm.conf"
    conf_path.write_text(render_slurm_conf(
        root, hostname=hostname, cpus=cpus, real_memory_mib=max(_total_memory_mib() - 2048, 1024),
        ctld_port=_free_port(), slurmd_port=_free_port(), munge_socket=munge_socket))

    env = {**os.environ, "SLURM_CONF": str(conf_path)}
    handle = SlurmHandle(workdir=root, conf_path=conf_path, hostname=hostname, cpus=cpus,
                         munge_socket_dir=socket_dir)
    log_dir = root / "log"

    def launch(name: str, argv: list[str]) -> None:
        with open(log_dir / f"{name}.out", "wb") as out:
            handle.processes[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)

    try:
        launch("munged", [find_binary("munged") or "munged", "--foreground", f"--socket={munge_socket}",
                          f"--key-file={munge_key}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                          f"--seed-file={root / 'munge' / 'munged.seed'}",
                          f"--log-file={log_dir / 'munged.log'}"])
        _wait_for(lambda: munge_socket.exists(), 10.0, handle, "munged did not create its socket")
        launch("slurmctld", [find_binary("slurmctld") or "slurmctld", "-D", "-c", "-f", str(conf_path)])
        launch("slurmd", [find_binary("slurmd") or "slurmd", "-D", "-f", str(conf_path)])
        _wait_for(lambda: _node_idle(handle), timeout_s, handle,
                  f"the node did not become idle within {timeout_s:.0f} s")
    except BaseException:
        handle.stop()
        raise
    return handle


def _node_idle(handle: SlurmHandle) -> bool:
    result = handle.run("sinfo", "--noheader", "--Node", "--format=%T", timeout_s=10.0)
    return result.returncode == 0 and "idle" in result.stdout.split()


def _wait_for(ready: Callable[[], bool], timeout_s: float, handle: SlurmHandle, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in handle.processes.items():
            if proc.poll() is not None:
                raise SlurmStartError(f"{name} exited with status {proc.returncode} during start-up\n"
                                      f"{handle.log_tails()}")
        if ready():
            return
        time.sleep(0.2)
    raise SlurmStartError(f"{what}\n{handle.log_tails()}")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_slurm() -> None:
    """Skip the calling test if Slurm is not installed, or fail it when ``CI`` is set."""
    missing = missing_binaries()
    if not missing:
        return
    message = f"Slurm/munge not installed (missing: {', '.join(missing)}); install with `{INSTALL_HINT}`"
    if _ci():
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmHandle]:
    """Session-wide test cluster; sets ``SLURM_CONF`` in ``os.environ`` while it runs.

    Skipped when Slurm is not installed, unless ``CI`` is set: there a missing Slurm
    fails the run. Import it into a conftest (``from tests.slurm_cluster import slurm``)
    to use it elsewhere.
    """
    require_slurm()
    handle = start_slurm(tmp_path_factory.mktemp("slurm"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(handle.conf_path)
    try:
        yield handle
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        handle.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.slurm_cluster [WORKDIR]``: run a test cluster until Ctrl-C / SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("workdir", nargs="?", default=None, help="state and logs (default: a new temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="slurm-dev-")
    try:
        handle = start_slurm(workdir)
    except (SlurmNotInstalled, SlurmStartError) as exc:
        print(exc, flush=True)
        return 1
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"Slurm is up (node {handle.hostname}, partitions {handle.default_partition}, "
          f"{handle.short_partition}); in another shell:\n  export SLURM_CONF={handle.conf_path}\n"
          f"logs: {handle.log_dir}; stop with Ctrl-C", flush=True)
    try:
        while not stop and all(p.poll() is None for p in handle.processes.values()):
            time.sleep(0.5)
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
