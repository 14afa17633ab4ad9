"""User-facing messages: info to stdout, errors to stderr, no tracebacks for user mistakes."""

from __future__ import annotations

import sys


def info(message: str) -> None:
    print(message, flush=True)


def error(message: str) -> None:
    print(f"error: {message}" if not message.startswith(("error", "invalid")) else message,
          file=sys.stderr, flush=True)
