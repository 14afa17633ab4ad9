"""Start the real trainer (one process, or torchrun on CPU ranks) with checkpointing, watch it,
kill it, and read back what it printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "tests" / "trainer"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from trainer.metrics import parse_step_line  # noqa: E402
from trainer_harness import write_config  # noqa: E402

RESUMED = re.compile(r"^checkpoint: resumed from (\S+) \(step_(\d+)")
TINY = ["training.precision=fp32", "checkpoint.enabled=true"]


@dataclass
class Run:
    proc: subprocess.Popen[str]
    log: Path
    started: float

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_and_kill(self.proc)
            raise AssertionError(f"trainer did not finish in {timeout} s:\n{self.text()[-6000:]}") from None

    def kill(self) -> None:
        """SIGKILL the whole job at once, like a lost node: torchrun, every rank, the replicator."""
        signal_tree(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def signal_tree(pid: int, sig: int) -> None:
    """``sig`` to a process and all its descendants. torchrun starts each rank in a session of its
    own, so a process-group kill of torchrun never reaches the ranks; the tree is frozen first so
    nothing forks away between the listing and the kill."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.send_signal(signal.SIGSTOP)
        except psutil.NoSuchProcess:
            pass
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for proc in tree:
        try:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass


def dump_and_kill(proc: subprocess.Popen[str]) -> None:
    signal_tree(proc.pid, signal.SIGUSR1)  # ranks print their stacks (faulthandler)
    time.sleep(2)
    signal_tree(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def start(run_dir: Path, nproc: Optional[int], overrides: list[str], env: Optional[dict[str, str]] = None) -> Run:
    """``python -m trainer`` (nproc None) or torchrun with ``nproc`` ranks, output to run_dir/out.log."""
    config = write_config(run_dir, [f"cluster.gpus_per_node={nproc or 1}", *overrides])
    # not PYTHONUNBUFFERED: it makes every print two writes (the text, then the newline), so the lines of
    # rank 0 and of the replicator process, which share the log, interleave mid-line; the trainer flushes
    # each line it prints, as one write
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    full_env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    log = run_dir / "out.log"
    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "trainer", "--config", str(config)], cwd=ROOT,
                            env=full_env, stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return Run(proc, log, time.monotonic())


def run(run_dir: Path, nproc: Optional[int], overrides: list[str], env: Optional[dict[str, str]] = None,
        timeout: float = 180, expect_rc: int = 0) -> str:
    """The job's output; ``expect_rc=-1``: any non-zero exit."""
    job = start(run_dir, nproc, overrides, env)
    rc = job.wait(timeout)
    text = job.text()
    ok = rc != 0 if expect_rc == -1 else rc == expect_rc
    assert ok, f"exit {rc} (expected {'non-zero' if expect_rc == -1 else expect_rc}):\n{text[-6000:]}"
    return text


def wait_text(job: Run, text: str, timeout: float) -> None:
    """Until the job's output contains ``text`` (while it is alive)."""
    deadline = time.monotonic() + timeout
    while text not in job.text():
        if job.proc.poll() is not None:
            raise AssertionError(f"trainer exited ({job.proc.returncode}) before {text!r}:\n{job.text()[-6000:]}")
        if time.monotonic() > deadline:
            dump_and_kill(job.proc)
            raise AssertionError(f"{text!r} did not appear in {timeout} s:\n{job.text()[-6000:]}")
        time.sleep(0.05)


def losses(text: str) -> dict[int, float]:
    return {m.step: m.loss for m in (parse_step_line(line) for line in text.splitlines()) if m is not None}


def resumed_step(text: str) -> Optional[int]:
    for line in text.splitlines():
        match = RESUMED.match(line)
        if match:
            return int(match.group(2))
    return None


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Independent of the code under test: renamed step directories holding a manifest."""
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name[5:]) for p in ckpt_dir.iterdir()
                  if re.fullmatch(r"step_\d{8}", p.name) and (p / "manifest.json").is_file())


def wait_for(path_glob: tuple[Path, str], job: Run, timeout: float) -> Path:
    """The first file matching the glob, while the job is alive."""
    directory, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern)) if directory.exists() else []
        if found:
            return found[0]
        if job.proc.poll() is not None:
            raise AssertionError(f"trainer exited ({job.proc.returncode}) before {pattern} appeared:\n"
                                 f"{job.text()[-6000:]}")
        time.sleep(0.01)
    dump_and_kill(job.proc)
    raise AssertionError(f"{pattern} did not appear in {timeout} s:\n{job.text()[-6000:]}")
