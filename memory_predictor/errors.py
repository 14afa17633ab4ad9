"""The predictor's one exception: every problem names the field, its value and the fix.

``Problem`` is the config's own (configs.errors, a torch- and omegaconf-free module), so a
predictor problem reads the same as a config problem wherever the launcher reports it.
"""

from __future__ import annotations

from configs.errors import Problem

__all__ = ["Problem", "PredictorError", "raise_if"]


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
