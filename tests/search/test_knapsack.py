import random

import pytest

from lowbit.errors import ConfigError, LowbitError
from lowbit.search.knapsack import brute_force, solve


def _cost(costs, pick):
    return sum(costs[i][k] for i, k in enumerate(pick))


def _value(values, pick):
    return sum(values[i][k] for i, k in enumerate(pick))


def test_hand_made_example():
    # three layers, options (bits, loss): the cheap option of the sensitive layer is bad
    costs = [[16, 8, 4], [16, 8, 4], [16, 8, 4]]
    values = [[0.0, 0.01, 0.02], [0.0, 0.1, 5.0], [0.0, 0.02, 0.03]]
    pick = solve(costs, values, budget=16)      # 16 bits for three layers: 8 + 4 + 4
    assert pick == [2, 1, 2]
    assert _cost(costs, pick) == 16
    assert _value(values, pick) == pytest.approx(0.15)
    assert solve(costs, values, budget=48) == [0, 0, 0]
    assert solve(costs, values, budget=12) == [2, 2, 2]


@pytest.mark.parametrize("seed", range(25))
def test_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    costs = [[rng.randint(1, 20) for _ in range(k)] for _ in range(n)]
    values = [[rng.uniform(-1, 5) for _ in range(k)] for _ in range(n)]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = rng.randint(lo, hi)
    pick = solve(costs, values, budget)
    best, _ = brute_force(costs, values, budget)
    assert _cost(costs, pick) <= budget
    assert _value(values, pick) == pytest.approx(best, abs=1e-12)


def test_coarse_units_still_meet_the_budget():
    rng = random.Random(7)
    costs = [[rng.randint(10**5, 10**7) for _ in range(3)] for _ in range(5)]
    values = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(5)]
    budget = sum(sorted(c)[1] for c in costs)
    pick = solve(costs, values, budget, max_units=64)   # units of ~1e5 bits, rounded up
    assert _cost(costs, pick) <= budget
    best, _ = brute_force(costs, values, budget)
    assert _value(values, pick) >= best - 1e-12
    exact = solve(costs, values, budget)                 # the default resolution
    assert _value(values, exact) <= _value(values, pick) + 1e-12


def test_gcd_makes_large_costs_exact():
    costs = [[8 * 10**6, 4 * 10**6, 2 * 10**6]] * 4
    values = [[0.0, 1.0, 3.0], [0.0, 2.0, 2.5], [0.0, 0.5, 9.0], [0.0, 1.0, 1.1]]
    budget = 18 * 10**6
    pick = solve(costs, values, budget, max_units=16)
    best, _ = brute_force(costs, values, budget)
    assert _value(values, pick) == pytest.approx(best)


def test_infeasible_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="cheapest options cost 8, more than the budget 7"):
        solve([[4, 8], [4, 16]], [[1, 0], [1, 0]], budget=7)


@pytest.mark.parametrize("costs,values,msg", [
    ([[1, 2]], [[0.0]], "1 values"),
    ([[-1]], [[0.0]], "negative cost"),
    ([[1]], [[float("nan")]], "not finite"),
    ([[1]], [[0.0], [1.0]], "1 cost rows but 2 value rows"),
])
def test_bad_input(costs, values, msg):
    with pytest.raises(LowbitError, match=msg):
        solve(costs, values, 10)


def test_empty():
    assert solve([], [], 0) == []
