"""Slurm through its command-line tools: sbatch, squeue, sacct, scontrol, scancel.

Every process this module starts goes through one ``Runner`` (``run_command`` by default),
always as an argv list, so tests can hand ``SlurmCLI`` a fake. Parsing lives in pure
functions below, tested against real Slurm 22.05 output.

Where state comes from, in order (each step only for the jobs the previous left open):

1. ``squeue`` - pending/running/completing jobs, one call for all ids.
2. ``sacct -X`` - finished jobs, from slurmdbd. Without slurmdbd sacct answers
   "Slurm accounting storage is disabled"; then ``sacct -c``, which reads the
   jobcomp file (``JobCompType=jobcomp/filetxt``; only present where that file is
   readable, i.e. on the controller or a shared path).
3. ``scontrol show job -o <id>`` - works for MinJobAge seconds after a job ends.

A job nobody knows is ``UNKNOWN``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cluster.backend import (
    CONTROLLER_UNREACHABLE,
    SLURM_CLI_NOT_FOUND,
    UNREACHABLE_HINT,
    BackendError,
    BackendUnavailable,
    JobState,
    JobStatus,
    SubmitError,
    normalize_state,
    submission_hint,
)

log = logging.getLogger(__name__)

SQUEUE_FORMAT = "%i|%T|%M|%N|%r"  # reason last: the only field that could hold free text
SACCT_FIELDS = "JobID,State,ExitCode,Elapsed,NodeList,Reason"
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str], *, timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
    """Run one command without a shell. ``FileNotFoundError`` if the program is missing."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"`{' '.join(argv)}` did not answer within {timeout_s:.0f} s",
                           argv=list(argv)) from exc
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


# ----------------------------------------------------------------------------- parsing


def parse_sbatch_parsable(stdout: str) -> str:
    """Job id from ``sbatch --parsable``: ``"123"`` or ``"123;cluster"``."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("sbatch printed no job id")
    job_id = lines[-1].split(";", 1)[0].strip()
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise ValueError(f"sbatch printed {lines[-1]!r}, not a job id")
    return job_id


def parse_exit_code(text: str | None) -> tuple[int | None, int | None]:
    """``"1:0"`` -> (1, 0): return code and signal; empty or malformed -> (None, None)."""
    if not text:
        return None, None
    match = re.fullmatch(r"\s*(\d+)(?::(\d+))?\s*", text)
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else 0


def _clean(value: str | None) -> str | None:
    """Slurm's spellings of 'nothing' -> None."""
    if value is None:
        return None
    value = value.strip()
    return None if value in ("", "None", "(null)", "N/A", "Unknown") else value


def normalize_elapsed(text: str | None) -> str | None:
    """squeue's ``%M`` (``0:05``, ``1:02:03``, ``2-01:02:03``) -> ``[D-]HH:MM:SS`` like sacct."""
    text = _clean(text)
    if text is None:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not match:
        return text
    days, hours, minutes, seconds = match.groups()
    hms = f"{int(hours or 0):02d}:{int(minutes):02d}:{int(seconds):02d}"
    return f"{int(days)}-{hms}" if days else hms


def format_seconds(seconds: float | int | None) -> str | None:
    """Seconds -> ``[D-]HH:MM:SS``."""
    if seconds is None:
        return None
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


def parse_squeue(stdout: str) -> dict[str, JobStatus]:
    """Lines of ``squeue --noheader --format=%i|%T|%M|%N|%r``."""
    out: dict[str, JobStatus] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 4)
        if len(fields) < 5:
            log.warning("ignoring unexpected squeue line %r", line)
            continue
        job_id, state, elapsed, nodes, reason = (f.strip() for f in fields)
        out[job_id] = JobStatus(job_id, normalize_state(state), reason=_clean(reason),
                                nodes=_clean(nodes), elapsed=normalize_elapsed(elapsed))
    return out


def parse_sacct(stdout: str) -> dict[str, JobStatus]:
    """Lines of ``sacct [-c] -X -n -P --format=JobID,State,ExitCode,Elapsed,NodeList,Reason``.

    The jobcomp file behind ``sacct -c`` holds one record per run of a job, so a requeued job
    appears several times; records are in time order and the last one wins.
    """
    out: dict[str, JobStatus] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 6:
            log.warning("ignoring unexpected sacct line %r", line)
            continue
        job_id, state, exit_text, elapsed, nodes = (f.strip() for f in fields[:5])
        reason = "|".join(fields[5:])
        if "." in job_id:  # a step (batch, extern, 0); -X should have left them out
            continue
        code, signal = parse_exit_code(exit_text)
        out[job_id] = JobStatus(job_id, normalize_state(state), exit_code=code, reason=_clean(reason),
                                nodes=_clean(nodes), elapsed=normalize_elapsed(elapsed), signal=signal)
    return out


_SCONTROL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_:/]*")


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` from ``scontrol show job -o`` into a dict.

    A value may contain ``=`` (``TRES=cpu=1,mem=500M``) or spaces (a path); a token only
    starts a new key if the part before its first ``=`` looks like a key.
    """
    fields: dict[str, str] = {}
    key: str | None = None
    for token in text.strip().split():
        name, sep, value = token.partition("=")
        if sep and _SCONTROL_KEY.fullmatch(name):
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


def status_from_scontrol(fields: dict[str, str]) -> JobStatus:
    state = normalize_state(fields.get("JobState"))
    code, signal = parse_exit_code(fields.get("ExitCode"))
    if not state.terminal:
        code = signal = None  # ExitCode=0:0 means "not yet" while the job is alive
    return JobStatus(fields.get("JobId", ""), state, exit_code=code, reason=_clean(fields.get("Reason")),
                     nodes=_clean(fields.get("NodeList")), elapsed=normalize_elapsed(fields.get("RunTime")),
                     signal=signal)


def parse_slurm_version(text: str) -> tuple[int, int, int]:
    """``"slurm 22.05.8"`` (or ``"slurm-wlm 22.05.8"``) -> (22, 5, 8)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"no Slurm version in {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


_ACCOUNTING_DISABLED = re.compile(r"accounting storage is disabled", re.IGNORECASE)
_NO_SUCH_JOB = re.compile(r"Invalid job id specified", re.IGNORECASE)
_ALREADY_DONE = re.compile(r"already completing or completed|Job has already finished", re.IGNORECASE)


def backoff_delays(first_s: float = 1.0, cap_s: float = 60.0) -> Iterator[float]:
    """1, 2, 4, 8, ... seconds, never more than ``cap_s`` (submitit-style polling)."""
    delay = min(first_s, cap_s)
    while True:
        yield delay
        delay = min(delay * 2, cap_s)


# ----------------------------------------------------------------------------- backend


class SlurmCLI:
    """``JobBackend`` over the Slurm commands.

    ``runner`` runs one argv and returns a ``CommandResult`` (tests pass a fake);
    ``max_poll_interval_s`` caps the back-off of ``wait``; ``sleep``/``clock`` are injectable
    so tests of ``wait`` need not sleep.
    """

    def __init__(self, *, runner: Runner | None = None, max_poll_interval_s: float = 60.0,
                 first_poll_interval_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._runner: Runner = runner or run_command
        self.max_poll_interval_s = max_poll_interval_s
        self.first_poll_interval_s = first_poll_interval_s
        self._sleep = sleep
        self._clock = clock
        self._accounting: bool | None = None  # None: not yet known; False: sacct said disabled

    # -- the one place commands run
    def _run(self, argv: list[str]) -> CommandResult:
        try:
            return self._runner(argv)
        except FileNotFoundError as exc:
            raise BackendUnavailable(f"{SLURM_CLI_NOT_FOUND} (`{argv[0]}` is not on PATH)", argv=argv) from exc

    def _fail(self, what: str, result: CommandResult) -> BackendError:
        text = result.stderr.strip() or result.stdout.strip()
        message = f"{what} failed (exit {result.returncode})"
        if CONTROLLER_UNREACHABLE.search(text):
            message += f"; {UNREACHABLE_HINT}"
        return BackendError(message, stderr=text, argv=list(result.argv), returncode=result.returncode)

    # -- JobBackend
    def submit(self, script_path: str, *, job_name: str | None = None,
               extra_args: Sequence[str] = ()) -> str:
        argv = ["sbatch", "--parsable"]
        if job_name:
            argv.append(f"--job-name={job_name}")
        argv += [*extra_args, script_path]
        result = self._run(argv)
        if result.returncode != 0:
            text = result.stderr.strip() or result.stdout.strip()
            if CONTROLLER_UNREACHABLE.search(text):
                raise self._fail("sbatch", result)
            raise SubmitError(f"sbatch refused {script_path} (exit {result.returncode}):", stderr=text,
                              hint=submission_hint(text))
        if result.stderr.strip():
            log.warning("sbatch: %s", result.stderr.strip())
        try:
            return parse_sbatch_parsable(result.stdout)
        except ValueError as exc:
            raise BackendError(f"could not read the job id from sbatch: {exc}", stderr=result.stderr,
                               argv=argv) from exc

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return {}
        found: dict[str, JobStatus] = {}
        queued = self._squeue(ids)
        found.update({j: s for j, s in queued.items() if j in ids and not s.terminal})
        missing = [j for j in ids if j not in found]
        if missing:
            # UNKNOWN is not an answer: sacct -c loses the state of a job whose name has a
            # space (its jobcomp parser splits on blanks), scontrol still knows it.
            found.update({j: s for j, s in self._accounting_status(missing).items()
                          if j in missing and s.state is not JobState.UNKNOWN})
        for job_id in [j for j in ids if j not in found]:
            from_ctld = self._scontrol_status(job_id) or queued.get(job_id)
            if from_ctld is not None:
                found[job_id] = from_ctld
        return {j: found.get(j, JobStatus(j, JobState.UNKNOWN, reason="not known to squeue, sacct or scontrol"))
                for j in ids}

    def cancel(self, job_id: str) -> None:
        result = self._run(["scancel", str(job_id)])
        text = result.stderr.strip()
        if result.returncode != 0 and not _ALREADY_DONE.search(text):
            raise self._fail(f"scancel {job_id}", result)
        if text and not _ALREADY_DONE.search(text):
            log.warning("scancel %s: %s", job_id, text)

    def stop(self, job_id: str) -> None:
        result = self._run(["scancel", "--batch", "--signal=TERM", str(job_id)])
        text = result.stderr.strip()
        if result.returncode != 0 and not _ALREADY_DONE.search(text):
            raise self._fail(f"scancel --batch --signal=TERM {job_id}", result)

    # -- beyond the protocol
    def wait(self, job_ids: list[str], timeout_s: float | None = None,
             on_change: Callable[[JobStatus], None] | None = None) -> dict[str, JobStatus]:
        """Poll until every job is terminal; back-off 1, 2, 4 ... ``max_poll_interval_s``.

        ``on_change`` sees each job's first status and every change of state. A failed
        poll (controller briefly unreachable) is logged and retried. Raises
        ``TimeoutError`` after ``timeout_s``.
        """
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        deadline = None if timeout_s is None else self._clock() + timeout_s
        latest: dict[str, JobStatus] = {}
        delays = backoff_delays(self.first_poll_interval_s, self.max_poll_interval_s)
        while True:
            open_ids = [j for j in ids if j not in latest or not latest[j].terminal]
            if not open_ids:
                return latest
            try:
                current = self.status(open_ids)
            except BackendUnavailable:
                raise  # no Slurm commands here: retrying cannot help
            except BackendError as exc:
                log.warning("polling Slurm failed, will retry: %s", exc)
                current = {}
            for job_id, st in current.items():
                before = latest.get(job_id)
                latest[job_id] = st
                if on_change is not None and (before is None or before.state != st.state):
                    on_change(st)
            if all(j in latest and latest[j].terminal for j in ids):
                return latest
            delay = next(delays)
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    states = ", ".join(f"{j}={latest[j].state if j in latest else '?'}" for j in ids)
                    raise TimeoutError(f"jobs not finished after {timeout_s:.0f} s: {states}")
                delay = min(delay, left)
            self._sleep(delay)

    def requeue(self, job_id: str, *, hold: bool = False, start_now: bool = False,
                settle_timeout_s: float = 30.0) -> None:
        """Requeue a job (``scontrol requeue``; the job must allow it, e.g. ``--requeue``).

        Slurm holds a requeued job back ~2 minutes (Reason=BeginTime). ``start_now`` lifts
        that; it has to wait until the old run has finished COMPLETING, because Slurm sets
        the begin time only then and would overwrite an earlier ``StartTime=now``.
        """
        verb = "requeuehold" if hold else "requeue"
        result = self._run(["scontrol", verb, str(job_id)])
        if result.returncode != 0:
            raise self._fail(f"scontrol {verb} {job_id}", result)
        if not start_now or hold:
            return
        deadline = self._clock() + settle_timeout_s
        while True:
            info = self.job_info(job_id) or {}
            if normalize_state(info.get("JobState")) is not JobState.COMPLETING:
                break
            if self._clock() > deadline:
                raise BackendError(f"job {job_id} still COMPLETING {settle_timeout_s:.0f} s after requeue")
            self._sleep(0.2)
        if info.get("Reason") != "BeginTime":
            return  # already eligible (or already running again)
        result = self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        if result.returncode != 0:
            raise self._fail(f"scontrol update JobId={job_id} StartTime=now", result)

    def job_info(self, job_id: str) -> dict[str, str] | None:
        """``scontrol show job`` fields (StdOut, StdErr, WorkDir, ...); None once purged."""
        result = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        if result.returncode != 0:
            if _NO_SUCH_JOB.search(result.stderr):
                return None
            raise self._fail(f"scontrol show job {job_id}", result)
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        return parse_scontrol_record(lines[0]) if lines else None

    def stdout_path(self, job_id: str) -> str | None:
        info = self.job_info(job_id)
        return _clean(info.get("StdOut")) if info else None

    def version(self) -> tuple[int, int, int]:
        result = self._run(["scontrol", "--version"])
        if result.returncode != 0:
            raise self._fail("scontrol --version", result)
        return parse_slurm_version(result.stdout)

    # -- the three sources
    def _squeue(self, ids: list[str]) -> dict[str, JobStatus]:
        result = self._run(["squeue", "--noheader", f"--jobs={','.join(ids)}", f"--format={SQUEUE_FORMAT}"])
        if result.returncode != 0:
            # A single unknown id is an error for squeue; several ids with some unknown are not.
            if _NO_SUCH_JOB.search(result.stderr):
                return {}
            raise self._fail("squeue", result)
        return parse_squeue(result.stdout)

    def _accounting_status(self, ids: list[str]) -> dict[str, JobStatus]:
        base = ["-X", "-n", "-P", f"--format={SACCT_FIELDS}", f"--jobs={','.join(ids)}"]
        if self._accounting is not False:
            result = self._run(["sacct", *base])
            if result.returncode == 0:
                self._accounting = True
                return parse_sacct(result.stdout)
            if _ACCOUNTING_DISABLED.search(result.stderr):
                self._accounting = False
            else:
                log.warning("sacct failed, falling back to the jobcomp file and scontrol: %s",
                            result.stderr.strip())
        result = self._run(["sacct", "-c", *base])
        if result.returncode != 0:
            log.debug("sacct -c failed: %s", result.stderr.strip())
            return {}
        return parse_sacct(result.stdout)

    def _scontrol_status(self, job_id: str) -> JobStatus | None:
        info = self.job_info(job_id)
        if not info:
            return None
        st = status_from_scontrol(info)
        return st if st.job_id == job_id else JobStatus(job_id, st.state, st.exit_code, st.reason,
                                                        st.nodes, st.elapsed, st.signal)
