"""The predictor's one exception: every problem names the field, its value and the fix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    value: object
    fix: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.fix}"


class PredictorError(Exception):
    """Bad input to the predictor (a user mistake). The CLI prints it and exits with status 2."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"invalid input: {self.problems[0]}"
        else:
            text = "\n".join([f"invalid input ({len(self.problems)} problems):"] + [f"  - {p}" for p in self.problems])
        super().__init__(text)


def raise_if(problems: list[Problem]) -> None:
    if problems:
        raise PredictorError(problems)
