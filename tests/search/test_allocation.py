"""Knapsack allocation, sensitivities and the rule space."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from netpress.search.allocation import (
    RuleSpace,
    allocate,
    knapsack,
    measure_table,
    option_cost,
    rule_sparsities,
)
from netpress.search.sensitivity import prune_weight, quantize_weight, relative_error

from ._toy import toy_data, toy_model, toy_space


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    costs = (torch.rand(4, 5, generator=g) * 10).tolist()
    errors = (torch.rand(4, 5, generator=g)).tolist()
    budget = 1.2
    pick = knapsack(costs, errors, budget, bins=4000)
    assert pick is not None
    assert sum(errors[i][o] for i, o in enumerate(pick)) <= budget + 1e-9
    best = min((sum(costs[i][o] for i, o in enumerate(c)), c)
               for c in itertools.product(range(5), repeat=4)
               if sum(errors[i][o] for i, o in enumerate(c)) <= budget)
    got = sum(costs[i][o] for i, o in enumerate(pick))
    # the discretised DP may lose at most what one error step hides: within 2% of optimal
    assert got <= best[0] * 1.02 + 1e-9


def test_knapsack_infeasible_and_zero_budget() -> None:
    assert knapsack([[1.0, 2.0]], [[0.5, 0.6]], 0.1) is None
    assert knapsack([[1.0, 5.0]], [[0.5, 0.0]], 0.0) == [1]


def test_option_cost_monotone() -> None:
    assert option_cost(1000, 0.0, 8) == 1000
    assert option_cost(1000, 0.5, 8) < option_cost(1000, 0.5, 32)
    assert option_cost(1000, 0.9, 8) < option_cost(1000, 0.5, 8) < option_cost(1000, 0.0, 8)


def test_weight_transforms() -> None:
    w = torch.randn(16, 8)
    assert float((prune_weight(w, 0.5) == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    q8, q4 = quantize_weight(w, 8), quantize_weight(w, 4)
    assert relative_error(w, q8) < relative_error(w, q4) < 0.05
    assert relative_error(w, w) == 0.0


def test_measured_table_drives_allocation() -> None:
    model, data = toy_model(), toy_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = toy_space(model)
    table = measure_table(model, space, [x for x, _ in data[:1]], points=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for g in space.groups:
        errs = [table.prune[g][k]["error"] for k in sorted(table.prune[g], key=float)]
        assert errs[0] == 0.0 and errs[-1] > errs[0]  # more sparsity, more error
        assert table.quant[g]["4"]["error"] > table.quant[g]["8"]["error"]
    tight, loose = allocate(space, table, 1e-4), allocate(space, table, 0.5)
    assert tight is not None and loose is not None
    cost = lambda v: sum(option_cost(space.layer_sizes[g], v[f"sparsity[{g}]"],  # noqa: E731
                                     v[f"bits[{g}]"]) for g in space.groups)
    assert cost(loose) < cost(tight)


def test_rule_space() -> None:
    s = rule_sparsities(0.5, 1.0, {"a": 0.1, "b": 0.5, "c": 0.9})
    assert s["a"] > s["b"] > s["c"] and math.isclose(s["b"], 0.5)
    assert rule_sparsities(0.5, 0.0, {"a": 0.1, "b": 0.9}) == {"a": 0.5, "b": 0.5}
    space = RuleSpace(toy_space(toy_model()), {"conv1": 0.3, "conv2": 0.1, "fc": 0.2})
    recipe = space.build({"global": 0.4, "strength": 0.5})
    assert recipe.steps[0].per_layer["conv2"] == pytest.approx(0.6)  # type: ignore[attr-defined]


def test_sensitivity_probes_say_what_they_do(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import netpress._progress as progress

    model, data = toy_model(), toy_data()
    space = toy_space(model)
    steps: list[int] = []

    class Bar:
        def __enter__(self) -> object:
            return lambda n=1, **_: steps.append(n)

        def __exit__(self, *exc: object) -> None:
            return None

    monkeypatch.setattr(progress, "progress_enabled", lambda flag: True)
    monkeypatch.setattr(progress, "progress_bar", lambda total, text, enabled: Bar())
    measure_table(model, space, [x for x, _ in data[:1]], points=3, progress=True)
    line = capsys.readouterr().out
    groups = len(space.groups)
    assert line.startswith(f"search: measuring the sensitivity of {groups} layer group(s) to "
                           f"3 sparsities and 2 bit widths ({groups * 5} probes)")
    assert len(steps) == groups * 5  # the bar advanced once per probe
