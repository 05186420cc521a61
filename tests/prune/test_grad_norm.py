"""Gradient-norm importance (Lubana & Dick 2021) and the data-driven unstructured criteria."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import netpress as npr
from netpress.errors import DataError, RecipeError
from netpress.prune.importance import (
    grad_norm_saliency,
    hessian_gradient_product,
    unit_scores,
    weight_scores,
)
from netpress.testing import toy_batches, toy_models, weight_sparsity


def _tiny() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g))
            for _ in range(3)]
    return model, data


def test_hessian_gradient_product_matches_the_full_hessian():
    model, data = _tiny()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def total_loss(flat: torch.Tensor) -> torch.Tensor:
        chunks, i = [], 0
        for s in shapes:
            n = int(torch.tensor(s).prod())
            chunks.append(flat[i:i + n].reshape(s))
            i += n
        loss = flat.new_zeros(())
        for x, y in data:
            h = torch.tanh(F.linear(x, chunks[0], chunks[1]))
            loss = loss + F.cross_entropy(F.linear(h, chunks[2], chunks[3]), y)
        return loss

    hess = torch.autograd.functional.hessian(total_loss, flat0)
    grad = torch.autograd.functional.jacobian(total_loss, flat0)
    expected = hess @ grad

    def losses():
        for x, y in data:
            yield F.cross_entropy(model(x), y)

    got = torch.cat([h.reshape(-1) for h in hessian_gradient_product(losses, params)])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_weight_scores_and_unit_saliency():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    d = torch.tensor([[2.0, 1.0], [-4.0, 0.0]])
    assert weight_scores("magnitude", w).tolist() == [[1.0, 2.0], [0.5, 3.0]]
    assert weight_scores("taylor", w, d).tolist() == [[2.0, 2.0], [2.0, 0.0]]
    assert grad_norm_saliency(w, d).tolist() == [0.0, 2.0]  # |2 - 2|, |-2 + 0|
    assert unit_scores("grad_norm", [w], [d]).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="derivative"):
        weight_scores("grad_norm", w)


@pytest.mark.parametrize("importance", ["taylor", "grad_norm"])
def test_unstructured_data_importance_prunes_to_target(importance):
    model = toy_models()["TinyCNN"]
    data = toy_batches(model=model)
    res = npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.6, importance=importance),
                       calibration=data, measure=False)
    assert weight_sparsity(res.model) == pytest.approx(0.6, abs=1e-3)
    magnitude = npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.6), measure=False)
    chosen = [m.weight != 0 for m in (res.model.conv1, res.model.conv2, res.model.fc)]
    by_mag = [m.weight != 0 for m in (magnitude.model.conv1, magnitude.model.conv2,
                                      magnitude.model.fc)]
    assert any(not torch.equal(a, b) for a, b in zip(chosen, by_mag))


def test_grad_norm_pruning_preserves_the_gradient_norm():
    """Zeroing the weights with the lowest |w * Hg| moves ||g||^2 less than zeroing the same
    number with the highest scores (the criterion's first-order promise)."""
    model, data = _tiny()
    params = list(model.parameters())

    def losses():
        for x, y in data:
            yield F.cross_entropy(model(x), y)

    def grad_sq() -> float:
        total = [torch.zeros_like(p) for p in params]
        for loss in losses():
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g)
        return float(sum((t ** 2).sum() for t in total))

    hg = hessian_gradient_product(losses, params)
    scores = torch.cat([weight_scores("grad_norm", p, h).reshape(-1) for p, h in zip(params, hg)])
    base, k = grad_sq(), 3
    changes = []
    for idx in (scores.argsort()[:k], scores.argsort()[-k:]):
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector(params)
            flat[idx] = 0.0
            torch.nn.utils.vector_to_parameters(flat, params)
        changes.append(abs(grad_sq() - base))
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert changes[0] < changes[1]


def test_data_importance_needs_data_and_known_names():
    model = toy_models()["TinyMLP"]
    with pytest.raises(DataError, match="calibration"):
        npr.compress(model, npr.GlobalMagnitudePrune(sparsity=0.5, importance="taylor"),
                     measure=False)
    with pytest.raises(RecipeError, match="importance"):
        npr.GlobalMagnitudePrune(importance="hessian")


def test_structured_grad_norm_runs():
    from netpress.measure import count_macs

    model = toy_models()["TinyCNN"]
    data = toy_batches(model=model)
    x = data[0][0][:1]
    res = npr.compress(model, npr.StructuredPrune(macs=0.5, round_to=1, importance="grad_norm"),
                       calibration=data, example_inputs=x, measure=False)
    assert count_macs(res.model, x) <= 0.5 * count_macs(model, x)
