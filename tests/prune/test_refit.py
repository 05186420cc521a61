"""StructuredPrune's least-squares reconstruction on small models, one per kind of coupled
group: a residual stream, attention heads, a concatenation. Each refit must bring the pruned
model's outputs much closer to the original's than pruning alone (held-out inputs)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.reconstruct.structured import plan_refit
from netpress.testing import toy_transformer


class Residual(nn.Module):
    """A stem and two residual blocks on one 16-channel stream (identity shortcuts)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)) for _ in range(2))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated along channels, read by one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(24, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.head(F.relu(self.c(y)).mean((2, 3)))


def _images(n: int, seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return [(x[i:i + 32], None) for i in range(0, n, 32)]


def _tokens(n: int, seed: int) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return [(x[i:i + 32], None) for i in range(0, n, 32)]


def _randomised_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics as a trained model would hold them (not the identity)."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _error(model: nn.Module, ref: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(float((model(x) - ref(x)).pow(2).sum()) for x, _ in data)


def _prune(model: nn.Module, calib: list, test: list, **kw) -> tuple[float, float, dict]:
    """(error with the refit, error without, the refit's record)."""
    x = calib[0][0][:1]
    on = npr.compress(model, npr.StructuredPrune(**kw), calibration=calib, example_inputs=x,
                      measure=False)
    off = npr.compress(model, npr.StructuredPrune(reconstruct=False, recalibrate_bn=0, **kw),
                       calibration=calib, example_inputs=x, measure=False)
    record = on.report["steps"][-1]
    return _error(on.model, model, test), _error(off.model, model, test), record


def test_refit_through_a_pruned_residual_stream(one_thread):
    torch.manual_seed(0)
    model = _randomised_bn(Residual())
    on, off, rec = _prune(model, _images(256, 0), _images(128, 1), macs=0.5, round_to=1,
                          keep_streams=False)
    assert any("stem" in g for g in rec["groups"])  # the stream itself was cut
    assert rec["reconstruct"]["refitted_layers"] == 6  # the stem, 4 block convs, the head
    assert "bn_recalibrated_batches" not in rec
    assert on < 0.1 * off, (on, off)


def test_residual_streams_stay_whole_by_default(one_thread):
    from netpress.graph import analyze
    from netpress.prune._streams import residual_streams

    model = _randomised_bn(Residual())
    x = torch.randn(1, 3, 8, 8)
    assert residual_streams(model, analyze(model, x)) == ["stem.weight[dim 0]"]
    assert residual_streams(Concat(), analyze(Concat(), x)) == []
    kept = npr.compress(model, npr.StructuredPrune(macs=0.6, round_to=1), example_inputs=x,
                        measure=False).model
    assert kept.stem.out_channels == 16 and kept.blocks[0][0].out_channels < 16
    with pytest.warns(UserWarning, match="keep_streams"):  # unreachable whole: cut, said so
        cut = npr.compress(model, npr.StructuredPrune(macs=0.1, round_to=1, floor=0.0),
                           example_inputs=x, measure=False).model
    assert cut.stem.out_channels < 16


def test_refit_after_removing_attention_heads(one_thread):
    model = toy_transformer()
    on, off, rec = _prune(model, _tokens(256, 0), _tokens(128, 1), macs=0.6, round_to=1)
    pruned = npr.compress(model, npr.StructuredPrune(macs=0.6, round_to=1),
                          calibration=_tokens(64, 0), measure=False,
                          example_inputs=torch.randn(1, 1, 8, 8)).model
    assert pruned.blocks[0].o.in_features < 16 or pruned.blocks[1].o.in_features < 16
    assert on < 0.25 * off, (on, off)


def test_refit_after_pruning_a_concatenation(one_thread):
    torch.manual_seed(0)
    model = Concat().eval()
    on, off, rec = _prune(model, _images(256, 0), _images(128, 1), macs=0.5, round_to=1)
    assert rec["reconstruct"]["refitted_layers"] >= 1
    assert on < 0.1 * off, (on, off)


def test_plan_picks_the_consumers_with_their_original_rows_and_columns():
    torch.manual_seed(0)
    model = Concat().eval()
    pruned = copy.deepcopy(model)
    with torch.no_grad():  # by hand: branch b keeps channels 1 and 4, c keeps rows 0..7
        pruned.b.weight = nn.Parameter(model.b.weight[[1, 4]])
        pruned.b.bias = nn.Parameter(model.b.bias[[1, 4]])
        pruned.c.weight = nn.Parameter(model.c.weight[:8][:, [*range(12), 13, 16]])
        pruned.c.bias = nn.Parameter(model.c.bias[:8])
    kept = {"b.weight": [{0: torch.tensor([1, 4])}],
            "c.weight": [{0: torch.arange(8), 1: torch.tensor([*range(12), 13, 16])}]}
    plan = plan_refit(pruned, model, kept)
    assert list(plan) == ["c"]
    assert plan["c"].rows.tolist() == list(range(8))
    assert plan["c"].columns.tolist()[-18:] == [*range(117, 126), *range(144, 153)]
    assert set(plan_refit(pruned, model, kept, scope="all")) == {"a", "b", "c", "head"}
    with pytest.raises(ValueError, match="scope"):
        plan_refit(pruned, model, kept, scope="some")


class ConvBN(nn.Module):
    """A conv feeding a bias-free conv and its BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.conv = nn.Conv2d(6, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(F.relu(self.a(x))))


def test_intercept_of_a_bias_free_conv_goes_into_its_batchnorm():
    """Brute force: least squares with a ones column on the kept channels; the conv takes the
    weights and its BatchNorm's running mean drops by the intercept."""
    from netpress.reconstruct.structured import refit_pruned

    torch.manual_seed(0)
    model = _randomised_bn(ConvBN())
    kept = torch.tensor([0, 2, 3, 5])
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.a.weight = nn.Parameter(model.a.weight[kept])
        pruned.a.bias = nn.Parameter(model.a.bias[kept])
        pruned.conv.weight = nn.Parameter(model.conv.weight[:, kept])
    pruned.a.out_channels = pruned.conv.in_channels = 4
    data = _images(64, 0)
    rounds = {"a.weight": [{0: kept}], "conv.weight": [{1: kept}]}
    off = copy.deepcopy(pruned)
    refit_pruned(pruned, model, rounds, data, damp=0.0)
    refit_pruned(off, model, rounds, data, damp=0.0, intercept=False)
    with torch.no_grad():
        x = torch.cat([b for b, _ in data])
        feats = F.relu(model.a(x)).permute(0, 2, 3, 1).reshape(-1, 6).double()
    target = feats @ model.conv.weight[:, :, 0, 0].double().T
    design = torch.cat([feats[:, kept], torch.ones(len(feats), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, target).solution.T              # 4 × (4 + 1)
    assert torch.allclose(pruned.conv.weight[:, :, 0, 0].double(), sol[:, :4], atol=1e-4)
    shift = model.bn.running_mean.double() - pruned.bn.running_mean.double()
    assert torch.allclose(shift, sol[:, 4], atol=1e-4)
    assert torch.equal(off.bn.running_mean, model.bn.running_mean)
    assert _error(pruned, model, data) < 0.9 * _error(off, model, data)


def test_obs_importance_removes_what_its_readers_can_best_compensate(one_thread):
    """Group OBS: the greedy order's running error, scored per unit; on the concatenation it
    needs data, and with it the pruned model is closer to the original than with L2."""
    from netpress.errors import DataError
    from netpress.graph import analyze
    from netpress.reconstruct.channels import obs_scores

    torch.manual_seed(0)
    model = Concat().eval()
    calib, test = _images(96, 0), _images(64, 1)
    x = calib[0][0][:1]
    scores = obs_scores(model, analyze(model, x), calib)
    for s in scores:
        assert s is not None and np.all(s >= 0)
        assert len(np.unique(s)) == len(s)  # a strict order: cumulative errors
    with pytest.raises(DataError, match="obs"):
        npr.compress(model, npr.StructuredPrune(macs=0.5, importance="obs"),
                     example_inputs=x, measure=False)
    obs = npr.compress(model, npr.StructuredPrune(macs=0.5, round_to=1, importance="obs"),
                       calibration=calib, example_inputs=x, measure=False).model
    l2 = npr.compress(model, npr.StructuredPrune(macs=0.5, round_to=1), calibration=calib,
                      example_inputs=x, measure=False).model
    assert _error(obs, model, test) < _error(l2, model, test)
