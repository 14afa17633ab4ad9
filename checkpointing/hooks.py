"""One fault-injection point at named moments of a save and of an upload; inert by default.

The writer, the commit and the replicator call :func:`at` at the moments listed in ``PHASES``.
With ``HYPERLAUNCH_CKPT_HOOK`` unset (production) it returns at once and imports nothing. Set to
``module:function``, the function (from any importable module, e.g. a test module put on
``PYTHONPATH``) is imported once and called as ``function(phase, step)``: it may block, so a test
can SIGKILL the process provably inside that phase, or raise, to simulate a failure there. The
tests' own hook, which pauses, is ``tests/checkpointing/ckpt_pause_hook.py``; nothing here sleeps.

A malformed value (no ``module:function``, a module that does not import, a missing or
non-callable function) is a :class:`HookError` naming the variable. :func:`check` raises it at
start-up (the trainer's preflight, the replicator's command line), before any save.

Phases: ``write_data`` (a data file half-written), ``manifest`` (all data written, manifest not
yet), ``rename`` (manifest written, directory not yet renamed), ``latest`` (renamed, pointer not
yet updated), ``upload_data`` (some objects or parts of a step uploaded), ``upload_manifest``
(data objects verified in S3, manifest not uploaded), ``index`` (manifest uploaded, index not
updated).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

ENV = "HYPERLAUNCH_CKPT_HOOK"
PHASES = ("write_data", "manifest", "rename", "latest", "upload_data", "upload_manifest", "index")

Hook = Callable[[str, int], None]
_loaded: Optional[tuple[str, Hook]] = None


class HookError(Exception):
    """``HYPERLAUNCH_CKPT_HOOK`` does not name a callable."""


def load() -> Optional[Hook]:
    """The configured hook, or None when the variable is unset or empty; HookError when malformed."""
    global _loaded
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    if _loaded is not None and _loaded[0] == spec:
        return _loaded[1]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HookError(f"{ENV}={spec!r}: expected module:function (e.g. ckpt_pause_hook:at_phase), "
                        f"or unset {ENV} (no fault injection)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module's own import-time checks included
        raise HookError(f"{ENV}={spec!r}: cannot import {module_name}: {exc}; put its directory on PYTHONPATH "
                        f"or unset {ENV}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise HookError(f"{ENV}={spec!r}: {module_name} has no function {attr}")
    _loaded = (spec, function)
    return function


def check() -> None:
    """Raise HookError now (at start-up) rather than from inside a save."""
    load()


def at(phase: str, step: int) -> None:
    """A named moment of a save or an upload (see the module docstring)."""
    if not os.environ.get(ENV):
        return
    hook = load()
    if hook is not None:
        hook(phase, step)
