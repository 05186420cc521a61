"""GPTQ's memory cuts leave its results unchanged: the layers swapped for their codes during
the pass, the cross term dropped after the refit, the refit without its d x d copies."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import netpress as npr
from netpress.reconstruct import quantize as gptq_method
from netpress.reconstruct.engine import LayerStats, run_sequential
from netpress.reconstruct.gptq import gptq_quantize
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.lstsq import refit_target
from netpress.reconstruct.modules import GroupQuantConv, GroupQuantLinear
from netpress.reconstruct.obs import damped
from netpress.reconstruct.shrinkage import Shrinker


def _spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / (3 * d)


@pytest.mark.parametrize("pruned", [False, True])
def test_refit_target_equals_the_copying_solve_and_leaves_the_hessian_as_it_was(pruned):
    d, rows = 24, 7
    g = torch.Generator().manual_seed(1)
    h = _spd(d, 0)
    before = h.clone()
    if pruned:  # cross d_o x d_c, weight over the original inputs, start over the current
        cross = torch.randn(d + 5, d, dtype=torch.float64, generator=g)
        w = torch.randn(rows, d + 5, dtype=torch.float64, generator=g)
        start = torch.randn(rows, d, dtype=torch.float64, generator=g)
        residual = cross.T @ w.T - h @ start.T
    else:
        cross = h + 0.05 * torch.randn(d, d, dtype=torch.float64, generator=g)
        w, start = torch.randn(rows, d, dtype=torch.float64, generator=g), None
        residual = (cross - h).T @ w.T
    # the previous implementation: a damped copy, its factor, cholesky_solve
    expected = (w if start is None else start) \
        + torch.cholesky_solve(residual, torch.linalg.cholesky(damped(h, 0.01))).T
    got = refit_target(w, h, cross, 0.01, start=start)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(h, before)  # the in-place damping is undone exactly


def test_refit_target_restores_the_hessian_when_the_factorization_fails():
    h = -torch.eye(6, dtype=torch.float64)  # not positive definite even when damped
    before = h.clone()
    with pytest.raises(torch.linalg.LinAlgError):
        refit_target(torch.ones(2, 6, dtype=torch.float64), h, h.clone(), 0.01)
    assert torch.equal(h, before)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def _text() -> list:
    g = torch.Generator().manual_seed(0)
    return [({"input_ids": torch.randint(0, 64, (4, 12), generator=g),
              "attention_mask": torch.ones(4, 12, dtype=torch.long)}, None) for _ in range(3)]


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect")
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


def _images() -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 3, 4, 4, generator=g), None) for _ in range(3)]


def _float_pass(model: nn.Module, cfg: npr.GPTQ, data: list) -> dict[str, tuple]:
    """The pass as before the cut: float layers hold the dequantized weights to the end."""
    work = copy.deepcopy(model)
    codes: dict[str, tuple] = {}

    def solve(name: str, view: LayerView, stats: LayerStats) -> None:
        w, out = view.matrix(), []
        for g in range(w.shape[0]):
            assert stats.hessian is not None and stats.cross is not None
            h = stats.hessian[g]
            target = refit_target(w[g], h, stats.cross[g], cfg.damp)
            out.append(gptq_quantize(target, h, cfg.bits, group_size=cfg.group_size,
                                     act_order=cfg.act_order, damp=cfg.damp))
        view.set_matrix(torch.stack([r.weight for r in out]))
        codes[name] = (torch.cat([r.codes for r in out]), torch.cat([r.scale for r in out]),
                       torch.cat([r.zero for r in out]))

    run_sequential(work, model, list(cfg.selected(work)), data, solve,
                   prepare=Shrinker(cfg.shrinkage))  # as the method shrinks each Hessian
    return codes


@pytest.mark.parametrize(("make", "inputs", "group"), [(_bert, _text, 16), (_Convs, _images, 8)],
                         ids=["bert", "convs"])
@pytest.mark.parametrize("act_order", [True, False])
def test_layers_swapped_during_the_pass_give_the_codes_of_the_float_pass(make, inputs, group,
                                                                          act_order):
    model, data = make(), inputs()
    cfg = npr.GPTQ(bits=4, group_size=group, act_order=act_order)
    expected = _float_pass(model, cfg, data)
    res = npr.compress(model, [cfg], calibration=data, example_inputs=data[0][0],
                       measure=False)
    assert len(expected) >= 3
    for name, (codes, scale, zero) in expected.items():
        layer = res.model.get_submodule(name)
        assert isinstance(layer, (GroupQuantLinear, GroupQuantConv)), name
        assert torch.equal(layer.weight_q, codes.reshape(layer.weight_q.shape)), name
        assert torch.equal(layer.weight_scale, scale.half()), name
        assert layer.weight_zero is not None
        assert torch.equal(layer.weight_zero, zero.to(torch.uint8)), name


def test_fitted_layers_are_already_codes_when_the_next_group_is_fitted(monkeypatch):
    calibrate = gptq_method.calibrate
    counts: list[int] = []

    def spying(model, cfg, ctx, names, solve):
        def spy(name, view, stats):
            counts.append(sum(isinstance(m, GroupQuantLinear) for m in model.modules()))
            solve(name, view, stats)
        return calibrate(model, cfg, ctx, names, spy)

    monkeypatch.setattr(gptq_method, "calibrate", spying)
    data = _text()
    npr.compress(_bert(), [npr.GPTQ(bits=4, group_size=16)], calibration=data,
                 example_inputs=data[0][0], measure=False)
    assert counts == list(range(len(counts))) and len(counts) == 13  # 2 x 6 + the pooler
