"""Run a job on this machine: the same trainer entrypoint, through torchrun.

``--standalone`` gives a private c10d rendezvous on a free port, so two local runs never
collide. The process gets its own session so ``cancel`` can stop torchrun and every rank.
Output is streamed to the terminal and to ``<run>/logs/local.out`` line by line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from configs.schema import ClusterConfig

LOG_NAME = "local.out"
# torch 2.13's torchrun shares one TCP store across rendezvous rounds and the workers use it without
# a per-round prefix: after an in-job restart the new workers read the dead ones' keys and hang in
# init_process_group. Opting out gives every round its own store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def local_command(cluster: ClusterConfig, config_path: str, max_restarts: int = 0) -> list[str]:
    """torchrun with the launcher's own interpreter (cluster.python is for remote nodes)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cluster.gpus_per_node}", f"--max-restarts={max_restarts}",
            "-m", "trainer", "--config", config_path]


def render_launch_script(command: list[str], workdir: str) -> str:
    import shlex

    return "\n".join(["#!/bin/bash", "# The exact command this local run executed.", "set -euo pipefail",
                      f"cd {shlex.quote(workdir)}", " ".join(shlex.quote(c) for c in command), ""])


class LocalExecutor:
    """Runs the command in the foreground, tees output, returns the exit status."""

    def __init__(self, run_dir: Path, workdir: str, echo: TextIO | None = sys.stdout):
        self.run_dir = run_dir
        self.workdir = workdir
        self.echo = echo

    def run(self, command: list[str], on_start: Callable[[int], None] | None = None,
            env: dict[str, str] | None = None, watchdog: bool = False) -> int:
        """``watchdog``: the hang watchdog (cluster.watchdog) watches the ranks next to torchrun."""
        log_path = self.run_dir / "logs" / LOG_NAME
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = self.workdir + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
        full_env["HYPERLAUNCH_RUN_DIR"] = str(self.run_dir)
        full_env["HYPERLAUNCH_CONTROL_DIR"] = str(self.run_dir / "control")
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.update(TORCHRUN_ENV)
        with open(log_path, "a", buffering=1) as log:
            proc = subprocess.Popen(command, cwd=self.workdir, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            if on_start is not None:
                on_start(proc.pid)
            guard = None
            if watchdog:
                guard = subprocess.Popen([sys.executable, "-m", "cluster.watchdog", "--run-dir", str(self.run_dir),
                                          "--parent-pid", str(proc.pid)], cwd=self.workdir, env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            try:
                for line in proc.stdout or ():
                    log.write(line)
                    if self.echo is not None:
                        self.echo.write(line)
                        self.echo.flush()
                return proc.wait()
            except KeyboardInterrupt:
                stop_process_group(proc.pid)
                proc.wait()
                return 130
            finally:
                if guard is not None:
                    guard.terminate()
                    try:
                        guard.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        guard.kill()


def stop_process_group(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM the run's process group, SIGKILL after a grace period. False if already gone."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped, is not alive)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
