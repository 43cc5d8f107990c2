"""Multiple-choice knapsack: one option per item, least total value within a cost budget.

The automatic mixed-precision search is this problem: items are layers, options are
formats, costs are the bits a layer's weight occupies (codes + scales), values are the
predicted loss increases, assumed additive over layers.

:func:`solve` is a dynamic program over the budget. Costs are integers (bits); when the
slack above the cheapest choice is larger than ``max_units`` steps, costs are counted in
units of ``ceil(slack / max_units)`` bits, rounded *up*, so the answer always meets the
budget and is optimal up to that rounding (exact when the slack fits in ``max_units`` steps
of the costs' greatest common divisor).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lowbit.errors import ConfigError


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int,
          max_units: int = 1 << 15) -> list[int]:
    """Indices ``[n_items]`` of the options minimizing ``sum(values)`` with
    ``sum(costs) <= budget``.

    Args:
        costs: ``costs[i][c]``, non-negative integer cost (bits) of option ``c`` of item ``i``.
        values: ``values[i][c]``, what is minimized (e.g. loss increase, nats/token); any
            finite float, negative allowed.
        budget: the largest allowed total cost (same unit as ``costs``).
        max_units: resolution of the dynamic program (memory ``n_items * max_units`` bytes).

    Raises:
        ConfigError: shapes disagree, a cost is negative, a value is not finite, or even the
            cheapest options exceed ``budget``.
    """
    n = len(costs)
    if len(values) != n:
        raise ConfigError(f"knapsack: {n} cost rows but {len(values)} value rows")
    if n == 0:
        return []
    c = [np.asarray(r, dtype=np.int64).reshape(-1) for r in costs]
    v = [np.asarray(r, dtype=np.float64).reshape(-1) for r in values]
    for i, (ci, vi) in enumerate(zip(c, v)):
        if ci.size == 0 or ci.size != vi.size:
            raise ConfigError(f"knapsack: item {i} has {ci.size} costs and {vi.size} values "
                              "(expected the same positive number)")
        if (ci < 0).any():
            raise ConfigError(f"knapsack: item {i} has a negative cost")
        if not np.isfinite(vi).all():
            raise ConfigError(f"knapsack: item {i} has a value that is not finite")
    base = int(sum(int(ci.min()) for ci in c))
    if base > budget:
        raise ConfigError(f"knapsack: the cheapest options cost {base}, more than the budget "
                          f"{budget}")
    extra = [ci - ci.min() for ci in c]
    slack = int(budget - base)
    g = 0
    for e in extra:
        for x in e.tolist():
            g = math.gcd(g, int(x))
    unit = max(g, 1)
    if slack // unit > max_units:
        unit = max(unit, -(-slack // max_units))
    cap = slack // unit
    units = [-(-e // unit) for e in extra]  # ceil: never under-count a cost
    best = np.zeros(cap + 1, dtype=np.float64)  # best[s]: least value with extra cost <= s
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        # cheaper options first, so that ties keep the smaller one
        for k in sorted(range(units[i].size), key=lambda k: (int(c[i][k]), k)):
            u = int(units[i][k])
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[:cap + 1 - u] + v[i][k]
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best, choice[i] = new, pick
    s = cap
    out = [0] * n
    for i in range(n - 1, -1, -1):
        k = int(choice[i][s])
        out[i] = k
        s -= int(units[i][k])
    total = sum(int(c[i][k]) for i, k in enumerate(out))
    assert total <= budget, (total, budget)
    return out


def brute_force(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
                budget: int) -> tuple[float, list[int]] | None:
    """The optimum by enumeration (tiny problems only, for tests): ``(value, indices)``, or
    None when nothing fits."""
    import itertools

    best = None
    for pick in itertools.product(*[range(len(r)) for r in costs]):
        cost = sum(costs[i][k] for i, k in enumerate(pick))
        if cost > budget:
            continue
        val = sum(values[i][k] for i, k in enumerate(pick))
        if best is None or val < best[0]:
            best = (val, list(pick))
    return best
