"""The reinforcement-learning search strategy (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest

from netpress.search import Choice, Range, search
from netpress.search.objectives import Size
from netpress.search.rl import PolicyTable, options_of, reinforce_update, returns, softmax

from ._toy import toy_data, toy_model, toy_space


def test_returns_sum_the_future_rewards():
    assert returns([1.0, 0.0, 2.0]) == [3.0, 2.0, 2.0]
    assert returns([1.0, 1.0], gamma=0.5) == [1.5, 1.0]


def test_reinforce_update_follows_the_log_likelihood_gradient():
    logits = np.array([0.3, -0.2, 0.1])
    eps, a = 1e-6, 1
    numeric = np.array([(np.log(softmax(logits + eps * np.eye(3)[i])[a])
                         - np.log(softmax(logits - eps * np.eye(3)[i])[a])) / (2 * eps)
                        for i in range(3)])
    assert np.allclose(reinforce_update(logits, a, 1.0, 1.0) - logits, numeric, atol=1e-6)


def test_policy_learns_the_best_action_of_a_bandit_with_step_rewards():
    rng = np.random.default_rng(0)
    policy = PolicyTable.uniform([3, 2], lam=1.0)
    best = (2, 0)
    for _ in range(200):
        acts = policy.sample(rng)
        rewards = [1.0 if acts[0] == best[0] else 0.0, 0.5 if acts[1] == best[1] else 0.0]
        policy.learn(acts, rewards, lr=0.5)
    assert [int(np.argmax(lg)) for lg in policy.logits] == list(best)


def test_options_of_domains():
    assert options_of(Choice([4, 8])) == [4, 8]
    assert options_of(Range(0.0, 0.2, step=0.1)) == [0.0, 0.1, 0.2]
    assert options_of(Range(1, 3)) == [1, 2, 3]


def test_rl_search_finds_a_feasible_smaller_model(one_thread: None) -> None:
    model, data = toy_model(), toy_data()
    space = toy_space(model)
    dense = Size().measure(model, space.build(
        {k: (0.0 if k.startswith("sparsity") else 8) for k in space.params}), data[0][0][:1])
    result = search(model, space, objective="size", constraints=["agreement>=0.95"], trials=8,
                    strategy="rl", evaluate=data, chunk=100, seed=0)
    assert len(result.trials) == 8
    assert all(t["source"] == "rl" for t in result.trials)
    assert result.best_value is not None and result.best_value < 0.9 * dense


def test_rl_replays_deterministically(one_thread: None) -> None:
    model, data = toy_model(), toy_data()
    runs = [search(model, toy_space(model), objective="size", constraints=["agreement>=0.95"],
                   trials=4, strategy="rl", evaluate=data, chunk=100, seed=3)
            for _ in range(2)]
    assert [t["params"] for t in runs[0].trials] == [t["params"] for t in runs[1].trials]


@pytest.mark.parametrize("points", [3])
def test_rl_on_a_recipe_space_uses_terminal_rewards(points: int, one_thread: None) -> None:
    import netpress as npr
    from netpress.search import RL, RecipeSpace, Step

    model, data = toy_model(), toy_data()
    space = RecipeSpace([Step(npr.GlobalMagnitudePrune, sparsity=Range(0.0, 0.8, step=0.2))])
    result = search(model, space, objective="size", constraints=["agreement>=0.9"], trials=4,
                    strategy=RL(points=points), evaluate=data, chunk=100)
    assert len(result.trials) == 4 and result.best_value is not None
