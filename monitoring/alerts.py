"""Alert texts, rate limiting, secret redaction, log tails and the cross-rank failure board."""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from configs.monitoring_config import AlertConfig
from monitoring.events import Alert, Level, RankIdentity, StragglerReport, ThroughputReport

SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY|SESSION_KEY|CREDENTIAL)", re.I)
_SECRET_PATTERNS = (
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\b[0-9a-f]{40}\b"),  # W&B API key (40 hex characters)
    re.compile(r"(?i)\b((?:api[_-]?key|token|secret|password|passwd)\s*[=:]\s*)['\"]?[^\s'\",;]+"),
)
MAX_TEXT = 3500  # Slack shows about 4,000 characters of an alert


def redact(text: str, secret_names: Iterable[str] = ()) -> str:
    """Remove the values of secret environment variables and anything shaped like a key."""
    names = {n for n in os.environ if SECRET_NAME.search(n)} | set(secret_names)
    for name in names:
        value = os.environ.get(name, "")
        if len(value) >= 6:
            text = text.replace(value, "[redacted]")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", text)
    return text


@dataclass
class RateLimiter:
    """Same title at most once per ``min_interval_s``; at most ``max_per_hour`` alerts in all.

    Terminal alerts (job started/finished/failed) pass always. Suppressed alerts are counted and
    the count is appended to the next alert of that title that goes out.
    """

    cfg: AlertConfig
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, float] = field(default_factory=dict)
    _sent: deque[float] = field(default_factory=deque)
    suppressed: dict[str, int] = field(default_factory=dict)

    def admit(self, alert: Alert) -> Optional[Alert]:
        now = self.clock()
        while self._sent and now - self._sent[0] > 3600:
            self._sent.popleft()
        if not alert.terminal:
            last = self._last.get(alert.title)
            if (last is not None and now - last < self.cfg.min_interval_s) or len(self._sent) >= self.cfg.max_per_hour:
                self.suppressed[alert.title] = self.suppressed.get(alert.title, 0) + 1
                return None
        self._last[alert.title] = now
        self._sent.append(now)
        dropped = self.suppressed.pop(alert.title, 0)
        if dropped:
            alert = Alert(alert.title, f"{alert.text}\n({dropped} similar alert{'s' * (dropped > 1)} suppressed "
                          "by the rate limit)", alert.level, alert.terminal)
        return alert


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def log_tail(run_dir: Optional[str], lines: int) -> str:
    """The last lines of this job's log: logs/local.out, or the Slurm %x_<jobid>.out/.err."""
    if not run_dir or lines <= 0:
        return ""
    logs = Path(run_dir) / "logs"
    job = os.environ.get("SLURM_JOB_ID")
    candidates = [logs / "local.out"]
    if job and logs.is_dir():
        candidates = sorted(logs.glob(f"*_{job}.err")) + sorted(logs.glob(f"*_{job}.out")) + candidates
    for path in candidates:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                tail = fh.read().decode("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            return f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail)
    return ""


def describe_error(error: BaseException, tb_lines: int = 12) -> tuple[str, str]:
    """(reason, traceback tail) of an exception."""
    reason = f"{type(error).__name__}: {error}".strip()
    formatted = "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()
    return reason.splitlines()[0][:500] if reason else type(error).__name__, "\n".join(formatted[-tb_lines:])


# -- alert texts ---------------------------------------------------------------------------------

def _who(rank: int, identities: dict[int, RankIdentity]) -> str:
    ident = identities.get(rank)
    return ident.describe() if ident else f"rank {rank}"


def _ranks_title(prefix: str, ranks: tuple[int, ...]) -> str:
    """One title per set of ranks: W&B and the rate limit suppress repeats by title, not new ranks."""
    shown = ", ".join(str(r) for r in ranks[:3]) + (f" (+{len(ranks) - 3} more)" if len(ranks) > 3 else "")
    return f"{prefix}: rank{'s' * (len(ranks) > 1)} {shown}"


def straggler_alerts(run: str, report: StragglerReport) -> list[Alert]:
    out = []
    by_rank = {s.rank: s for s in report.scores}
    if report.raised:
        lines = []
        for r in report.raised[:8]:
            s = by_rank[r]
            slower = (s.window_median_s / s.reference_s - 1) * 100 if s.reference_s else 0.0
            lines.append(f"{_who(r, report.identities)}: score {s.score:.2f} (relative {s.relative:.2f}, "
                         f"individual {s.individual:.2f}); compute {s.window_median_s * 1e3:.1f} ms per step, "
                         f"{slower:+.0f}% vs its peers' reference {s.reference_s * 1e3:.1f} ms")
        if len(report.raised) > 8:
            lines.append(f"... and {len(report.raised) - 8} more ranks")
        out.append(Alert(_ranks_title("Straggler detected", report.raised),
                         "\n".join(lines) + f"\n(run {run}, step {report.step})", Level.WARN))
    if report.cleared:
        names = "; ".join(f"{_who(r, report.identities)} (score {by_rank[r].score:.2f})" for r in report.cleared[:8])
        out.append(Alert(_ranks_title("Straggler cleared", report.cleared),
                         f"{names} (run {run}, step {report.step})", Level.INFO))
    return out


def throughput_alert(run: str, report: ThroughputReport, flagged: Iterable[int]) -> Optional[Alert]:
    if not report.changed:
        return None
    if report.dropped:
        drop = (1 - report.tokens_per_s / report.baseline) * 100 if report.baseline else 0.0
        stragglers = ", ".join(str(r) for r in flagged) or "none flagged"
        return Alert("Throughput drop", f"run {run}, step {report.step}: {report.tokens_per_s:,.0f} tokens/s, "
                     f"{drop:.0f}% below its baseline {report.baseline:,.0f} tokens/s; "
                     f"straggler ranks: {stragglers}", Level.WARN)
    return Alert("Throughput recovered", f"run {run}, step {report.step}: {report.tokens_per_s:,.0f} tokens/s "
                 f"(baseline {report.baseline:,.0f})", Level.INFO)


# -- failure board -------------------------------------------------------------------------------

class FailureBoard:
    """Failure records in ``<run>/monitoring/failures``: any rank posts, rank 0 reports and acks.

    Only rank 0 holds the W&B run. A rank that fails posts a record and waits (bounded) for rank
    0's acknowledgement before exiting, because its exit makes torchrun stop rank 0 at once.
    """

    def __init__(self, run_dir: str):
        self.dir = Path(run_dir) / "monitoring" / "failures"

    def post(self, rank: int, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".rank-{rank}.json.tmp"
        tmp.write_text(json.dumps({"rank": rank, "time": time.time(), **record}))
        os.replace(tmp, self.dir / f"rank-{rank}.json")

    def wait_ack(self, rank: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self.dir / f"rank-{rank}.ack").exists():
                return True
            time.sleep(0.1)
        return False

    def records(self) -> list[dict]:
        out = []
        for path in sorted(self.dir.glob("rank-*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            rec["acked"] = (self.dir / f"rank-{rec.get('rank')}.ack").exists()
            out.append(rec)
        return sorted(out, key=lambda r: r.get("time", 0))

    def ack(self, rank: int) -> None:
        (self.dir / f"rank-{rank}.ack").touch()

    def listen(self) -> None:
        """Rank 0's W&B worker is watching: failing ranks wait for its acknowledgement."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "listening").touch()

    def unlisten(self) -> None:
        (self.dir / "listening").unlink(missing_ok=True)

    def listening(self) -> bool:
        return (self.dir / "listening").exists()

    def clear(self) -> None:
        """Records of an earlier incarnation of this run (a requeue) were reported already."""
        for path in [*self.dir.glob("rank-*.*"), self.dir / "listening"]:
            path.unlink(missing_ok=True)
