"""Optional backend over pyslurm's object API (pyslurm >= 23.2), and ``select_backend``.

pyslurm is a Cython binding built against one Slurm major release (pyslurm X.Y.* needs
Slurm X.Y), so it is imported lazily and only chosen automatically when its version
matches the cluster's. The sbatch CLI (``cluster.slurm_cli``) stays the default path.

Known limits of pyslurm's script submission (read from its source, 23.2-25.x), why the
CLI remains the reference: ``JobSubmitDescription.load_sbatch_options`` reads one
``#SBATCH`` option per line and silently skips options it has no attribute for
(``--hint``, ``--gpu-freq``, ...); and ``signal`` is parsed but never applied when the
job is built, so ``#SBATCH --signal=USR2@90`` (checkpoint before the time limit) is lost.
Prefer ``cluster.slurm_backend=cli`` for training jobs that rely on ``--signal``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from cluster.backend import (
    CONTROLLER_UNREACHABLE,
    UNREACHABLE_HINT,
    BackendError,
    BackendUnavailable,
    JobBackend,
    JobState,
    JobStatus,
    SubmitError,
    normalize_state,
    submission_hint,
)
from cluster.slurm_cli import Runner, SlurmCLI, format_seconds, parse_slurm_version

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "cli", "pyslurm")


def _is_rpc_error(module: ModuleType, exc: BaseException) -> bool:
    rpc_error = getattr(module, "RPCError", None)
    return isinstance(rpc_error, type) and isinstance(exc, rpc_error)


class PyslurmBackend:
    """``JobBackend`` through pyslurm's object API.

    ``module`` is the imported ``pyslurm`` (injected by tests); by default it is imported here.
    """

    def __init__(self, module: ModuleType | None = None) -> None:
        self._pyslurm = module if module is not None else importlib.import_module("pyslurm")

    def submit(self, script_path: str, *, job_name: str | None = None) -> str:
        ps = self._pyslurm
        # With a path, pyslurm reads the file as the script body; the #SBATCH header is
        # only honoured after load_sbatch_options() (sbatch does that parsing client-side).
        desc = ps.JobSubmitDescription(script=script_path)
        desc.load_sbatch_options()
        if job_name:
            desc.name = job_name  # like `sbatch --job-name`, the argument beats the header
        try:
            job_id = desc.submit()
        except Exception as exc:
            if not _is_rpc_error(ps, exc) and not isinstance(exc, ValueError):
                raise
            text = str(exc)
            if CONTROLLER_UNREACHABLE.search(text):
                raise BackendError(f"pyslurm submit failed; {UNREACHABLE_HINT}", stderr=text) from exc
            raise SubmitError(f"Slurm refused {script_path} (pyslurm):", stderr=text,
                              hint=submission_hint(text)) from exc
        return str(job_id)

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        ps = self._pyslurm
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        found: dict[str, JobStatus] = {}
        for job_id in ids:
            try:
                job = ps.Job.load(int(job_id))
            except Exception as exc:
                if not _is_rpc_error(ps, exc):
                    raise
                if CONTROLLER_UNREACHABLE.search(str(exc)):  # not "purged": nothing is known about the job
                    raise BackendError(f"pyslurm could not load job {job_id}; {UNREACHABLE_HINT}",
                                       stderr=str(exc)) from exc
                continue  # purged from slurmctld (older than MinJobAge): ask the database
            found[job_id] = self._from_ctld_job(job_id, job)
        missing = [j for j in ids if j not in found]
        if missing:
            found.update(self._from_database(missing))
        return {j: found.get(j, JobStatus(j, JobState.UNKNOWN, reason="not known to slurmctld or slurmdbd"))
                for j in ids}

    def cancel(self, job_id: str) -> None:
        ps = self._pyslurm
        try:
            ps.Job(int(job_id)).cancel()  # pyslurm ignores "already done" itself
        except Exception as exc:
            if _is_rpc_error(ps, exc):
                raise BackendError(f"cancelling job {job_id} failed", stderr=str(exc)) from exc
            raise

    def stop(self, job_id: str) -> None:
        """pyslurm's signal API differs between releases; scancel (always next to libslurm) does it."""
        from cluster.slurm_cli import SlurmCLI

        SlurmCLI().stop(job_id)

    @staticmethod
    def _from_ctld_job(job_id: str, job: Any) -> JobStatus:
        state = normalize_state(getattr(job, "state", None))
        code = getattr(job, "exit_code", None) if state.terminal else None
        signal = getattr(job, "exit_code_signal", None) if state.terminal else None
        run_time = getattr(job, "run_time", None)
        return JobStatus(job_id, state, exit_code=code, reason=_none_if_empty(getattr(job, "state_reason", None)),
                         nodes=_none_if_empty(getattr(job, "allocated_nodes", None)),
                         elapsed=format_seconds(run_time), signal=signal)

    def _from_database(self, ids: list[str]) -> dict[str, JobStatus]:
        ps = self._pyslurm
        try:
            db_jobs = ps.db.Jobs.load(ps.db.JobFilter(ids=[int(j) for j in ids]))
        except Exception as exc:
            if not _is_rpc_error(ps, exc):
                raise
            log.debug("pyslurm.db.Jobs.load failed (no slurmdbd?): %s", exc)
            return {}
        out: dict[str, JobStatus] = {}
        for job in _iter_jobs(db_jobs):
            job_id = str(getattr(job, "id", ""))
            if job_id not in ids:
                continue
            state = normalize_state(getattr(job, "state", None))
            out[job_id] = JobStatus(
                job_id, state, exit_code=getattr(job, "exit_code", None),
                reason=_none_if_empty(getattr(job, "state_reason", None)),
                nodes=_none_if_empty(getattr(job, "nodelist", None)),
                elapsed=format_seconds(getattr(job, "elapsed_time", None)),
                signal=getattr(job, "exit_code_signal", None))
        return out


def _iter_jobs(collection: Any) -> Iterable[Any]:
    """pyslurm.db.Jobs is a list in 23.2 and a (multi-cluster) mapping later."""
    values = getattr(collection, "values", None)
    return list(values()) if callable(values) else list(collection)


def _none_if_empty(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text in ("", "None", "(null)") else text


def pyslurm_version(module: ModuleType) -> tuple[int, int, int]:
    """pyslurm's own version; its first two numbers are the Slurm release it was built for."""
    version_fn = getattr(module, "version", None)
    text = version_fn() if callable(version_fn) else getattr(module, "__version__", "")
    return parse_slurm_version(str(text))


def select_backend(preference: str = "auto", *, runner: Runner | None = None,
                   import_module: Callable[[str], ModuleType] = importlib.import_module) -> JobBackend:
    """The backend for ``cluster.slurm_backend``: ``cli``, ``pyslurm``, or ``auto``.

    ``auto`` takes pyslurm only if it imports and its major.minor equals the Slurm that
    ``scontrol --version`` reports (pyslurm 25.5.x <-> Slurm 25.05.x); otherwise the CLI.
    An explicit ``pyslurm`` that cannot work raises ``BackendUnavailable`` saying why.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"slurm backend {preference!r} is not one of {', '.join(PREFERENCES)}")
    cli = SlurmCLI(runner=runner)
    if preference == "cli":
        return cli
    try:
        module = import_module("pyslurm")
    except Exception as exc:  # ImportError, or an ABI error from a libslurm mismatch
        if preference == "pyslurm":
            raise BackendUnavailable(
                f"cluster.slurm_backend=pyslurm, but `import pyslurm` failed ({type(exc).__name__}: {exc}). "
                "Install the pyslurm release matching the cluster's Slurm (pyslurm X.Y for Slurm X.Y, "
                "built against its headers) or set cluster.slurm_backend=cli.") from exc
        return cli
    try:
        ours = pyslurm_version(module)[:2]
        theirs = cli.version()[:2]
    except (BackendError, ValueError) as exc:
        if preference == "pyslurm":
            raise BackendUnavailable(f"cannot check pyslurm against the cluster's Slurm version: {exc}") from exc
        log.info("using the Slurm CLI: cannot compare pyslurm and Slurm versions (%s)", exc)
        return cli
    if ours != theirs:
        message = (f"pyslurm is built for Slurm {ours[0]}.{ours[1]:02d} but the cluster runs "
                   f"Slurm {theirs[0]}.{theirs[1]:02d}")
        if preference == "pyslurm":
            raise BackendUnavailable(f"cluster.slurm_backend=pyslurm: {message}; install the matching "
                                     "pyslurm or set cluster.slurm_backend=cli.")
        log.info("using the Slurm CLI: %s", message)
        return cli
    return PyslurmBackend(module)
