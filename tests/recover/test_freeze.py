"""Recovery with frozen parameters (``freeze=``): what is frozen, and what still trains."""

import copy

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError, SelectionError
from netpress.recover.freeze import frozen, frozen_names


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(x).mean(1))


def _data(n: int = 3) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 10, (8, 5), generator=g), None) for _ in range(n)]


def test_frozen_names_modules_parameters_and_patterns():
    net = _Net()
    assert frozen_names(net, ("emb",)) == ["emb.weight"]
    assert frozen_names(net, ("body.0.bias",)) == ["body.0.bias"]
    assert frozen_names(net, ("re:body\\.\\d",)) == ["body.0.weight", "body.0.bias",
                                                     "body.2.weight", "body.2.bias"]
    assert frozen_names(net, ("re:.*bias",)) == ["body.0.bias", "body.2.bias"]
    assert frozen_names(net, ()) == []


def test_unknown_pattern_names_itself_and_bad_field_type_is_refused():
    with pytest.raises(SelectionError, match="'encoder'"):
        frozen_names(_Net(), ("encoder",))
    with pytest.raises(RecipeError, match="freeze"):
        npr.Distill(max_steps=1, freeze="emb")  # type: ignore[arg-type]


def test_frozen_restores_requires_grad():
    net = _Net()
    net.body[2].bias.requires_grad_(False)
    with frozen(net, ("body",)) as names:
        assert len(names) == 4
        assert not any(p.requires_grad for p in net.body.parameters())
        assert net.emb.weight.requires_grad
    assert [p.requires_grad for p in net.body.parameters()] == [True, True, True, False]


def test_distill_leaves_frozen_parameters_and_trains_the_rest_as_without_freeze():
    torch.manual_seed(0)
    student = _Net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    common = {"max_steps": 1, "lr": 0.1, "optimizer": "sgd", "momentum": 0.0,
              "loss": "mse", "lr_schedule": "constant"}
    x = _data(1)[0][0]
    runs = {}
    for key, freeze in (("free", ()), ("frozen", ("emb",))):
        runs[key] = npr.compress(student, [npr.Distill(freeze=freeze, **common)],
                                 reference=teacher, train=_data(1), example_inputs=x,
                                 measure=False).model
    # the frozen embedding did not move; it did without freeze
    assert torch.equal(runs["frozen"].emb.weight, student.emb.weight)
    assert not torch.allclose(runs["free"].emb.weight, student.emb.weight)
    # one SGD step: the other parameters' gradient does not depend on the embedding's update
    for a, b, orig in zip(runs["frozen"].body.parameters(), runs["free"].body.parameters(),
                          student.body.parameters()):
        assert torch.allclose(a, b, atol=1e-7)
        assert not torch.equal(a, orig)
    # the returned model is trainable again, and the user's model was not touched
    assert all(p.requires_grad for p in runs["frozen"].parameters())
