"""Reinforcement-learning search (AMC, HAQ, PuRL): a policy picks one action per layer.

An *episode* is one trial. Its steps are the space's parameters in order (per group: the
sparsity, then the bit width); at step ``t`` the policy picks an action ``a_t`` among that
parameter's options (a :class:`Choice`'s options, a :class:`Range`'s grid). As in PuRL,
every step is rewarded, not only the last one:

* **step reward** (on a :class:`LayerwiseSpace` with a measured sensitivity table):
  ``r_t = share_t * saved_t - lam * err_t``, where ``saved_t`` is the fraction of the
  group's dense bytes the action saves (:func:`option_cost`), ``share_t`` the group's share of
  all weights, ``err_t`` the measured output error of that action alone (the knapsack's
  table) and ``lam`` a Lagrange multiplier, raised after each infeasible trial and lowered
  after each feasible one;
* **terminal reward** (every space), from the measured trial: ``-objective / scale`` when
  feasible, minus ``1 + 10 * violation`` when not (``scale``: the first measured objective).

The policy is a softmax over each step's options (a table of logits: the state is the
layer index) trained by REINFORCE with a per-step running-mean baseline on the returns
``G_t = sum_{k >= t} r_k``. The strategy keeps no state of its own: before each proposal it
replays the finished trials of the study in order, so a resumed journal gives the same
policy. Proposals never repeat a finished trial's parameters when another sample can avoid it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from netpress.search.space import Choice, Domain

if TYPE_CHECKING:
    import optuna

    from netpress.search.allocation import SensitivityTable
    from netpress.search.strategies import Proposal, StrategyContext

__all__ = ["RL", "options_of", "returns", "reinforce_update", "PolicyTable"]


def options_of(dom: Domain, points: int = 7) -> list[Any]:
    """The discrete actions of a parameter: a Choice's options or a Range's grid."""
    if isinstance(dom, Choice):
        return list(dom.options)
    values = dom.grid(points)
    if not dom.is_int:
        return values
    return list(dict.fromkeys(int(round(v)) for v in values))  # distinct, in order


def returns(rewards: Sequence[float], gamma: float = 1.0) -> list[float]:
    """``G_t = sum_{k >= t} gamma^(k-t) r_k`` for every step."""
    out, acc = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    e = np.exp(z)
    return np.asarray(e / e.sum())


def reinforce_update(logits: np.ndarray, action: int, advantage: float, lr: float) -> np.ndarray:
    """One REINFORCE step on a softmax policy: ``theta += lr * A * grad log pi(a)``,
    where ``grad log pi(a) = onehot(a) - pi``."""
    grad = -softmax(logits)
    grad[action] += 1.0
    return np.asarray(logits + lr * advantage * grad)


@dataclass
class PolicyTable:
    """Per-step logits, per-step baselines and the Lagrange multiplier."""

    logits: list[np.ndarray]
    baselines: list[float | None]
    lam: float

    @classmethod
    def uniform(cls, sizes: Sequence[int], lam: float) -> PolicyTable:
        return cls([np.zeros(n) for n in sizes], [None] * len(sizes), lam)

    def learn(self, actions: Sequence[int], rewards: Sequence[float], lr: float,
              momentum: float = 0.8) -> None:
        """REINFORCE with a running-mean baseline per step."""
        for t, (a, g) in enumerate(zip(actions, returns(rewards))):
            base = self.baselines[t]
            if base is not None:
                self.logits[t] = reinforce_update(self.logits[t], a, g - base, lr)
            self.baselines[t] = g if base is None else momentum * base + (1 - momentum) * g

    def sample(self, rng: np.random.Generator) -> list[int]:
        return [int(rng.choice(len(lg), p=softmax(lg))) for lg in self.logits]


@dataclass(frozen=True)
class RL:
    """Policy-gradient search with per-layer actions and a reward at every step (PuRL-like).

    ``lr``: REINFORCE step size; ``lam``: the initial weight of the measured error in the
    step rewards; ``points``: grid points of a continuous Range without a step.
    """

    lr: float = 2.0
    lam: float = 5.0
    points: int = 7
    retries: int = 20
    name: str = "rl"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)  # only if a proposal is impossible

    def propose(self, study: optuna.Study, ctx: StrategyContext) -> Proposal | None:
        from netpress.search.strategies import Proposal

        params = ctx.space.params
        names = list(params)
        opts = [options_of(params[n], self.points) for n in names]
        policy = self.replay(study, ctx, names, opts)
        seed = int((study.user_attrs.get("identity") or {}).get("seed", 0))
        rng = np.random.default_rng([seed, len(study.trials)])
        seen = [t.params for t in study.trials]
        for _ in range(self.retries):
            picks = policy.sample(rng)
            values = {n: o[a] for n, o, a in zip(names, opts, picks)}
            if values not in seen:
                break
        return Proposal(values, {"source": "rl", "lam": round(policy.lam, 6)})

    def replay(self, study: optuna.Study, ctx: StrategyContext, names: list[str],
               opts: list[list[Any]]) -> PolicyTable:
        """The policy after learning from every finished trial, in trial order."""
        policy = PolicyTable.uniform([len(o) for o in opts], self.lam)
        steps = _StepRewards(ctx, names)
        scale: float | None = None
        for trial in sorted(study.trials, key=lambda t: t.number):
            outcome = trial.user_attrs.get("outcome")
            if outcome is None or any(n not in trial.params for n in names):
                continue
            actions = [_index(o, trial.params[n]) for n, o in zip(names, opts)]
            rewards = [steps.reward(n, trial.params[n], trial.params, policy.lam)
                       for n in names]
            objective, feasible = outcome.get("objective"), bool(outcome.get("feasible"))
            if scale is None and objective:
                scale = abs(float(objective)) or 1.0
            rewards[-1] += _terminal(objective, feasible, outcome, scale or 1.0)
            policy.learn(actions, rewards, self.lr)
            policy.lam = policy.lam * 0.8 if feasible else policy.lam * 1.5
        return policy


def _index(options: list[Any], value: Any) -> int:
    """The action index of a recorded value (the nearest option for floats)."""
    if value in options:
        return options.index(value)
    nums = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
    if isinstance(value, (int, float)) and len(nums) == len(options):
        return int(np.argmin([abs(float(o) - float(value)) for o in options]))
    return 0


def _terminal(objective: Any, feasible: bool, outcome: Mapping[str, Any], scale: float) -> float:
    value = -float(objective) / scale if objective is not None else -2.0
    if feasible:
        return value
    slack = [float(c.get("slack", -1.0)) for c in outcome.get("constraints", [])]
    violation = max([-s for s in slack if s < 0] or [1.0])
    return value - 1.0 - 10.0 * violation


class _StepRewards:
    """``share * saved - lam * err`` per step of a LayerwiseSpace; 0 without a table.

    A group's saved bytes are credited causally: its sparsity step earns what pruning saves
    at 32 bits, its bit-width step what quantizing the kept weights saves on top.
    """

    def __init__(self, ctx: StrategyContext, names: list[str]) -> None:
        from netpress.search.space import LayerwiseSpace

        self.space = ctx.space if isinstance(ctx.space, LayerwiseSpace) else None
        self.table: SensitivityTable | None = ctx.table
        self.share: dict[str, float] = {}
        if self.space is not None:
            sizes = {g: sum(self.space.layer_sizes[n] for n in ms)
                     for g, ms in self.space.groups.items()}
            total = sum(sizes.values()) or 1
            self.share = {g: s / total for g, s in sizes.items()}

    def reward(self, name: str, value: Any, params: Mapping[str, Any], lam: float) -> float:
        if self.space is None or self.table is None:
            return 0.0
        from netpress.search.allocation import option_cost

        kind, _, rest = name.partition("[")
        group = rest[:-1]
        dense = option_cost(1, 0.0, 32.0)
        if kind == "sparsity":
            saved = 1.0 - option_cost(1, float(value), 32.0) / dense
            err = _lookup(self.table.prune.get(group, {}), float(value))
        else:
            s = float(params.get(f"sparsity[{group}]", 0.0))
            saved = (option_cost(1, s, 32.0) - option_cost(1, s, float(value))) / dense
            err = _lookup(self.table.quant.get(group, {}), float(value))
        return self.share[group] * saved - lam * err


def _lookup(table: Mapping[str, Mapping[str, float]], x: float) -> float:
    if not table:
        return 0.0
    pts = sorted((float(k), v["error"]) for k, v in table.items())
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))
