"""Run megatron-core on CPU processes (gloo): every CUDA assumption it makes, answered here.

megatron-core 0.16 calls ``torch.cuda`` in many places (RNG tracker, schedules, DDP buffers,
optimizer type checks, sequence-parallel backward). On a machine without CUDA,
:func:`activate` installs, once and before megatron is imported:

1. ``torch.cuda`` stubs: ``current_device() -> 0``, ``device_count() -> 1``; streams, events,
   ``synchronize``, ``set_device``, ``empty_cache`` and the CUDA seeding functions do nothing.
2. A :class:`~torch.overrides.TorchFunctionMode` that maps ``device="cuda"`` (or an int
   device) to the CPU, makes ``Tensor.cuda()``/``pin_memory()`` no-ops, and makes
   ``Tensor.type()`` report ``torch.cuda.*`` (the optimizer and ``clip_grads`` insist on it).
   Mode handlers run with the mode popped, so ``backward`` is re-entered through the autograd
   engine with the mode pushed again: custom ``autograd.Function.backward`` code (e.g. the
   sequence-parallel all-gather buffer on ``torch.cuda.current_device()``) is redirected too.
3. An RNG tracker backed by the CPU generator, installed as megatron's tracker, and CPU
   versions of megatron's private cuda RNG get/set used by activation recompute.

On a CUDA machine :func:`activate` does nothing and returns False.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: "_CudaToCpuMode | None" = None


def activate() -> bool:
    """Install the CPU layer when CUDA is absent; idempotent. True when it is active."""
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is None:
        _install_cuda_stubs()
        _install_rng_tracker()
        _ACTIVE_MODE = _CudaToCpuMode()
        _ACTIVE_MODE.__enter__()  # process-wide for this (main) thread, like a device context
    return True


def is_active() -> bool:
    return _ACTIVE_MODE is not None


# --------------------------------------------------------------------------- torch.cuda stubs


class _Stream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event if isinstance(event, _Event) else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    """Stands in for ``torch.cuda.Event``; timing through it reads 0 (use wall clocks on CPU)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


_DEFAULT_STREAM = _Stream()


def _noop(name: str) -> Any:
    """A distinct no-op per stubbed name (torch._dynamo refuses one object under two names)."""

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _install_cuda_stubs() -> None:
    stubs: dict[str, Any] = {
        "current_device": lambda: 0,
        "device_count": lambda: 1,  # e.g. `rank % device_count()` in megatron's checkpoint worker
        "Stream": _Stream,
        "Event": _Event,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
    }
    for name in ("synchronize", "set_device", "empty_cache", "manual_seed", "manual_seed_all",
                 "reset_peak_memory_stats"):
        stubs[name] = _noop(name)
    for name, value in stubs.items():
        setattr(torch.cuda, name, value)
    for name in ("get_rng_state", "set_rng_state"):
        setattr(torch.cuda.random, name, stubs[name])


# --------------------------------------------------------------------------- RNG tracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's named RNG streams (data-, model-, expert-parallel) on the CPU generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # activation recompute saves and restores "the cuda state" next to the CPU one
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


# --------------------------------------------------------------------------- device mapping


def _cpu_device(device: Any) -> Any:
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


_TO_METHODS = {torch.Tensor.to}
_BACKWARDS = {torch.Tensor.backward, torch.autograd.backward}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placements to the CPU for every torch call made while it is pushed."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func in _BACKWARDS:
            return self._backward(func, args, kwargs)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in _TO_METHODS:
            args = (args[0],) + tuple(_cpu_device(a) for a in args[1:])
        return func(*args, **kwargs)

    def _backward(self, func: Any, args: tuple, kwargs: dict) -> None:
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        if func is torch.Tensor.backward:
            names = ("gradient", "retain_graph", "create_graph", "inputs")
            bound = dict(zip(names, args[1:]), **kwargs)
            tensors: tuple = (args[0],)
            grads = bound.get("gradient")
        else:
            positional = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
            bound = dict(zip(positional, args[1:]), **kwargs)
            tensors = (args[0],) if isinstance(args[0], torch.Tensor) else tuple(args[0])
            grads = bound.get("grad_tensors")
        inputs = bound.get("inputs")
        inputs_tuple = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        create_graph = bool(bound.get("create_graph", False))
        retain_graph = bound.get("retain_graph")
        if retain_graph is None:
            retain_graph = create_graph
        grads_tuple = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
        with self:  # the engine runs Function.backward code on this thread: keep redirecting
            _engine_run_backward(tensors, grads_tuple, retain_graph, create_graph, inputs_tuple,
                                 allow_unreachable=True, accumulate_grad=True)
