"""The one way a configuration mistake is reported: every problem names the field, its value and the fix.

Components check their own part through an ``AddProblem`` callback and the caller raises one
``ConfigError`` listing everything, so a user fixes all mistakes in one go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

AddProblem = Callable[[str, object, str], None]


@dataclass(frozen=True)
class Problem:
    field: str
    value: object
    fix: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.fix}"


class ConfigError(Exception):
    """A user mistake in the config. Printed without a traceback; exit status 2."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))
