"""Deterministic one- and few-parameter minimisation (no numpy/scipy on the predictor's path).

``golden`` is what benchmarks/predictor_calibration.py fits the shipped constants with;
``coordinate_descent`` runs it over several parameters in turn (log-scaled, bounded), which is
how ``memory_predictor calibrate`` refits a cluster's efficiencies from its own runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping


def golden(f: Callable[[float], float], lo: float, hi: float, steps: int = 30) -> float:
    """The minimum of a unimodal f on [lo, hi] (golden-section search)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def coordinate_descent(loss: Callable[[Mapping[str, float]], float], start: Mapping[str, float],
                       bounds: Mapping[str, tuple[float, float]], *, rounds: int = 8, steps: int = 30) -> dict[str, float]:
    """Minimise ``loss`` over the parameters in ``bounds`` (positive; searched on a log scale),
    one at a time, ``rounds`` times; parameters not in ``bounds`` stay at ``start``.

    Each coordinate step keeps the old value unless the golden-section search found a lower loss,
    so the loss never rises from one step to the next.
    """
    current = dict(start)
    best = loss(current)
    for _ in range(rounds):
        before = best
        for name, (lo, hi) in bounds.items():
            def along(log_value: float, name: str = name) -> float:
                return loss({**current, name: math.exp(log_value)})

            candidate = math.exp(golden(along, math.log(lo), math.log(hi), steps))
            value = loss({**current, name: candidate})
            if value < best:
                current[name], best = candidate, value
        if before - best <= 1e-12 * max(1.0, abs(before)):
            break
    return current


def nelder_mead(f: Callable[[list[float]], float], x0: list[float], *, step: float = 1.0, iterations: int = 600,
                tolerance: float = 1e-14) -> list[float]:
    """The minimum of f near x0 (Nelder-Mead simplex: follows narrow valleys where two parameters trade
    off, which one-at-a-time searches cross only slowly)."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if j == i else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(p) for p in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if abs(values[-1] - values[0]) <= tolerance * max(1.0, abs(values[0])):
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]

        def toward(t: float) -> list[float]:
            return [c + t * (w - c) for c, w in zip(centroid, simplex[-1])]

        reflected = toward(-1.0)
        fr = f(reflected)
        if fr < values[0]:
            expanded = toward(-2.0)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = toward(0.5)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:  # shrink toward the best point
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, p)] for p in simplex[1:]]
                values = [values[0]] + [f(p) for p in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def minimise(loss: Callable[[Mapping[str, float]], float], start: Mapping[str, float],
             bounds: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Minimise ``loss`` over the (positive, bounded) parameters in ``bounds`` on a log scale: a
    Nelder-Mead simplex, then coordinate descent from where it ended (never worse than the start)."""
    names = list(bounds)
    if not names:
        return dict(start)
    lows = [math.log(bounds[k][0]) for k in names]
    highs = [math.log(bounds[k][1]) for k in names]

    def params(x: list[float]) -> dict[str, float]:
        return {**start, **{k: math.exp(min(max(v, lo), hi)) for k, v, lo, hi in zip(names, x, lows, highs)}}

    def f(x: list[float]) -> float:
        outside = sum(max(lo - v, 0.0, v - hi) ** 2 for v, lo, hi in zip(x, lows, highs))
        return loss(params(x)) + outside

    x = nelder_mead(f, [min(max(math.log(start[k]), lo), hi) for k, lo, hi in zip(names, lows, highs)])
    found = params(x)
    if loss(found) > loss(start):
        found = dict(start)
    return coordinate_descent(loss, found, bounds, rounds=3)


__all__ = ["golden", "coordinate_descent", "nelder_mead", "minimise"]
