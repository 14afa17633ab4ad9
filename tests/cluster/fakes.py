"""A scripted stand-in for the command runner, and the recorded real Slurm output."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from cluster.slurm_cli import CommandResult

FIXTURES = Path(__file__).parent / "fixtures"


@cache
def recorded(version: str = "22.05") -> dict:
    """Output of a real Slurm, written by ``python -m tests.cluster.capture_fixtures``."""
    return json.loads((FIXTURES / f"slurm_{version}.json").read_text())


def recorded_result(key: str, *path: str) -> CommandResult:
    entry = recorded()[key]
    for part in path:
        entry = entry[part]
    return CommandResult(tuple(entry["argv"]), entry["returncode"], entry["stdout"], entry["stderr"])


Responder = Callable[[tuple[str, ...]], CommandResult]


class FakeRunner:
    """Answers commands by prefix; records every argv.

    ``rules`` is a list of (argv prefix, answer) tried in order; an answer is a
    CommandResult, a callable taking the argv, or an exception to raise. Unmatched
    commands fail the test loudly.
    """

    def __init__(self, rules: list[tuple[Sequence[str], object]] | None = None) -> None:
        self.rules: list[tuple[tuple[str, ...], object]] = [(tuple(p), a) for p, a in (rules or [])]
        self.calls: list[tuple[str, ...]] = []

    def on(self, prefix: Sequence[str], answer: object) -> FakeRunner:
        self.rules.append((tuple(prefix), answer))
        return self

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        argv = tuple(argv)
        self.calls.append(argv)
        for prefix, answer in self.rules:
            if argv[:len(prefix)] == prefix:
                if isinstance(answer, BaseException):
                    raise answer
                if callable(answer):
                    return answer(argv)
                assert isinstance(answer, CommandResult)
                return CommandResult(argv, answer.returncode, answer.stdout, answer.stderr)
        raise AssertionError(f"unexpected command {argv}")

    def commands(self) -> list[str]:
        """The calls, each as 'program [first flag]' for compact assertions."""
        return [" ".join(c[:2]) if c[0] in ("sacct", "scontrol") else c[0] for c in self.calls]


def ok(stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult((), 0, stdout, stderr)


def fail(stderr: str, returncode: int = 1, stdout: str = "") -> CommandResult:
    return CommandResult((), returncode, stdout, stderr)
