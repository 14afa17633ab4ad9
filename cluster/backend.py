"""The narrow interface every job backend fills, and the types it speaks.

A backend submits an already rendered batch script, reports the state of jobs (batched),
and cancels a job. Everything else (resources, script rendering, packaging) lives
elsewhere. ``SlurmCLI`` (``cluster.slurm_cli``) and ``PyslurmBackend``
(``cluster.pyslurm_backend``) implement it; ``select_backend`` picks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable


class JobState(StrEnum):
    """Normalized job state; a ``str`` so it compares with and serializes as its name."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEUED = "REQUEUED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    SUSPENDED = "SUSPENDED"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset({
    JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.NODE_FAIL,
    JobState.PREEMPTED, JobState.OUT_OF_MEMORY, JobState.BOOT_FAIL, JobState.DEADLINE,
})

# Slurm spellings (long names from squeue %T / sacct / scontrol, compact codes from squeue %t)
# that are not already one of ours. Transitional states fold into the nearest coarse one.
_STATE_ALIASES: dict[str, JobState] = {
    "PD": JobState.PENDING, "R": JobState.RUNNING, "CG": JobState.COMPLETING, "CD": JobState.COMPLETED,
    "F": JobState.FAILED, "CA": JobState.CANCELLED, "TO": JobState.TIMEOUT, "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED, "OOM": JobState.OUT_OF_MEMORY, "RQ": JobState.REQUEUED,
    "BF": JobState.BOOT_FAIL, "DL": JobState.DEADLINE, "S": JobState.SUSPENDED,
    "CF": JobState.PENDING, "CONFIGURING": JobState.PENDING,  # nodes booting, user code not started
    "RD": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "RF": JobState.REQUEUED, "REQUEUE_FED": JobState.REQUEUED,
    "RH": JobState.REQUEUED, "REQUEUE_HOLD": JobState.REQUEUED,
    "RS": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "SI": JobState.RUNNING, "SIGNALING": JobState.RUNNING,
    "SO": JobState.COMPLETING, "STAGE_OUT": JobState.COMPLETING,
    "ST": JobState.SUSPENDED, "STOPPED": JobState.SUSPENDED,
    "SE": JobState.FAILED, "SPECIAL_EXIT": JobState.FAILED,
    "RV": JobState.CANCELLED, "REVOKED": JobState.CANCELLED,
}


def normalize_state(raw: str | None) -> JobState:
    """Map any Slurm state spelling to ``JobState``.

    Handles ``CANCELLED by 1000`` (sacct), ``CANCELLED+`` (sacct without ``-P``, truncated),
    compact squeue codes (``PD``, ``CG``) and lower case; anything else is ``UNKNOWN``.
    """
    if not raw or not raw.strip():
        return JobState.UNKNOWN
    word = raw.strip().split()[0].rstrip("+").upper()
    try:
        return JobState(word)
    except ValueError:
        return _STATE_ALIASES.get(word, JobState.UNKNOWN)


@dataclass(frozen=True)
class JobStatus:
    """What a backend knows about one job.

    ``exit_code`` is the batch script's return code (the part before ``:`` in Slurm's
    ``ExitCode=1:0``) and ``signal`` the signal that ended it (the part after); both are
    ``None`` when unknown (e.g. the job is still pending or only squeue saw it).
    ``elapsed`` is Slurm's ``[D-]HH:MM:SS`` text.
    """

    job_id: str
    state: JobState
    exit_code: int | None = None
    reason: str | None = None
    nodes: str | None = None
    elapsed: str | None = None
    signal: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, JobState):  # accept Slurm's spelling, keep the type honest
            object.__setattr__(self, "state", normalize_state(self.state))

    @property
    def terminal(self) -> bool:
        """True once the job can no longer change state on its own."""
        return self.state.terminal

    @property
    def succeeded(self) -> bool:
        return self.state == JobState.COMPLETED and self.exit_code in (0, None)


@runtime_checkable
class JobBackend(Protocol):
    """What the launcher needs from a scheduler."""

    def submit(self, script_path: str, *, job_name: str | None = None) -> str:
        """Submit a batch script; return the job id. Raises ``SubmitError`` if refused."""
        ...

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """States of all ``job_ids`` (one entry each, ``UNKNOWN`` if nobody knows the job)."""
        ...

    def cancel(self, job_id: str) -> None:
        """Cancel a job; a job that already ended is not an error."""
        ...

    def stop(self, job_id: str) -> None:
        """Ask a running job to stop gracefully: SIGTERM to the batch shell only, no kill (it asks the
        ranks to stop after the same step and save, then ends the job as cancelled). Signalling the
        steps too would end ``step.sh``/srun and Slurm would kill the ranks mid-save. A job that
        already ended is not an error."""
        ...


class BackendError(Exception):
    """A scheduler command failed for a reason other than refusing a submission."""

    def __init__(self, message: str, *, stderr: str = "", argv: list[str] | None = None,
                 returncode: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stderr = stderr.strip()
        self.argv = argv
        self.returncode = returncode

    def __str__(self) -> str:
        if self.stderr and self.stderr not in self.message:
            return f"{self.message}\n{self.stderr}"
        return self.message


class BackendUnavailable(BackendError):
    """The backend cannot be used here: Slurm commands missing, or pyslurm missing or built
    for another Slurm version."""


class SubmitError(Exception):
    """The scheduler refused a submission. ``str()`` is meant for the user as is:
    the message, the scheduler's own words, and a hint for the common causes."""

    def __init__(self, message: str, stderr: str = "", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stderr = stderr.strip()
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.message]
        if self.stderr:
            parts.append(self.stderr)
        if self.hint:
            parts.append(f"Hint: {self.hint}")
        return "\n".join(parts)


SLURM_CLI_NOT_FOUND = "Slurm CLI not found: run on a login node or use cluster=local"


# (pattern over the scheduler's error text, hint). First match wins, so specific before generic.
# The texts are Slurm's own (slurm_strerror and sbatch option parsing), identical through
# the CLI and through pyslurm's RPCError.
_SUBMIT_HINTS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.IGNORECASE), h) for p, h in (
    (r"unrecognized option '--container-",
     "the pyxis/enroot Slurm plugin is not installed on this cluster, so --container-image and "
     "--container-mounts are unknown. Run without a container image (use the cluster's Python "
     "environment) or ask the admins to install pyxis."),
    (r"Invalid generic resource \(gres\) specification",
     "this cluster does not define the GPU GRES you asked for (--gpus-per-node / --gres / --gpus). "
     "Many HyperPod clusters configure no GRES at all: drop the GPU request (nodes are allocated "
     "whole with --exclusive), or check what the nodes offer with `sinfo -o '%P %G'`."),
    (r"invalid partition specified|Invalid partition name specified",
     "that partition does not exist; list the partitions with `sinfo -s` and set the partition "
     "(or leave it empty to use the cluster's default)."),
    (r"Invalid account or account/partition combination specified|Invalid account",
     "your user has no association with that account (or not on this partition); see "
     "`sacctmgr show assoc user=$USER format=account,partition,qos`."),
    (r"Invalid qos specification",
     "that QOS does not exist or is not allowed for your account; see "
     "`sacctmgr show assoc user=$USER format=account,qos`."),
    (r"Requested time limit is invalid|time limit exceeds|Invalid --time specification",
     "the --time limit is missing, malformed, or longer than the partition allows; check the "
     "partition limit with `sinfo -o '%P %l'` and lower the time limit (format [D-]HH:MM:SS)."),
    (r"Node count specification invalid",
     "more nodes were requested than the partition has (or allows); check `sinfo -o '%P %D %T'` "
     "and lower the node count."),
    (r"More processors requested than permitted",
     "the job asks for more CPUs than the partition's nodes provide (--nodes x --ntasks-per-node x "
     "--cpus-per-task); check `sinfo -N -o '%N %c %m'` and lower the node or task count."),
    (r"Requested node configuration is not available|Memory specification can not be satisfied",
     "no node matches the request (CPUs, memory, GRES or features together); compare with "
     "`sinfo -N -o '%N %c %m %G %f'`. With whole-node jobs use --exclusive --mem=0."),
    (r"Invalid feature specification",
     "a --constraint names a feature no node has; see `sinfo -o '%N %f'`."),
    (r"Invalid node name specified",
     "--nodelist/--exclude names a node that does not exist; see `sinfo -N`."),
    (r"Job violates accounting/QOS policy",
     "the job exceeds a QOS or association limit (nodes, wall time, or running jobs); see "
     "`sacctmgr show qos` and `sacctmgr show assoc user=$USER`."),
))

# Not a refusal: the controller could not be asked. Backends raise BackendError for these.
CONTROLLER_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Could not establish a configuration source|"
    r"Socket timed out|Connection refused|Zero Bytes were transmitted or received", re.IGNORECASE)
UNREACHABLE_HINT = ("the Slurm controller is not reachable from here: run on a login node of the "
                    "cluster, check `scontrol ping` and SLURM_CONF, or use cluster=local.")


def submission_hint(error_text: str) -> str | None:
    """A hint for a refused submission, or None if the error is not one we recognise."""
    for pattern, hint in _SUBMIT_HINTS:
        if pattern.search(error_text):
            return hint
    return None


# Why a job is still pending, as Slurm words it, where waiting will not help.
_PENDING_HINTS: dict[str, str] = {
    "PartitionNodeLimit": "more nodes than the partition allows; it will never start",
    "PartitionTimeLimit": "time limit above the partition's maximum; it will never start",
    "PartitionConfig": "the request does not fit the partition (node count, CPUs or memory)",
    "ReqNodeNotAvail": "a requested node is down, drained or reserved",
    "BadConstraints": "the constraints cannot be satisfied by any node",
    "QOSMaxNodePerJobLimit": "more nodes than the QOS allows per job",
    "QOSMaxWallDurationPerJobLimit": "time limit above the QOS maximum",
    "AssocMaxJobsLimit": "the account's limit on running jobs is reached",
    "DependencyNeverSatisfied": "a job it depends on failed; cancel it",
    "JobHeldAdmin": "held by an administrator",
    "JobHeldUser": "held (release it with `scontrol release <id>`)",
}


def pending_hint(reason: str | None) -> str | None:
    """Explain a pending reason that means the job is stuck (None for ordinary waiting)."""
    if not reason:
        return None
    return _PENDING_HINTS.get(reason.split(",")[0].strip("()"))
