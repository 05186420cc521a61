"""The sequential calibration engine: grouping, statistics, early stop, sequential inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netpress.reconstruct._measure import measured
from netpress.reconstruct.engine import collect_statistics, plan_groups, run_sequential


class QKV(nn.Module):
    """Three layers reading one tensor, then one reading their combination, then a head
    that is only reached at the end (and a layer never called)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)
        self.head_calls = 0

    def forward(self, x):
        h = torch.relu(self.inp(x))
        y = self.q(h) * torch.sigmoid(self.k(h)) + self.v(h)
        self.head_calls += 1
        return self.out(torch.relu(y))


def _data(n=3, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, generator=g), None) for _ in range(n)]


NAMES = ["inp", "q", "k", "v", "out", "unused"]


def test_plan_groups_follows_call_order_and_shared_inputs():
    groups, calls, unused = plan_groups(QKV(), NAMES, _data()[0][0])
    assert groups == [["inp"], ["q", "k", "v"], ["out"]]
    assert calls == {"inp": 1, "q": 1, "k": 1, "v": 1, "out": 1} and unused == ["unused"]


def test_statistics_are_the_inputs_second_moments_and_the_pass_stops_early():
    model, data = QKV(), _data()
    inputs = torch.cat([x for x, _ in data])
    with torch.no_grad():
        h = torch.relu(model.inp(inputs)).double()
    _, calls, _ = plan_groups(model, NAMES[:5], data[0][0])
    model.head_calls = 0
    stats = collect_statistics(model, None, ["q", "k"], data, mode="sequential-local",
                               calls=calls)
    assert model.head_calls == 0  # stopped before the rest of the model ran
    for name in ("q", "k"):
        s = stats[name]
        assert s.samples == 15 and s.cross is None
        assert torch.allclose(s.hessian[0], h.T @ h / 15, atol=1e-6)
        assert torch.allclose(s.sq_norms[0], (h * h).mean(0), atol=1e-6)
    plain = collect_statistics(model, model, ["q"], data, mode="plain", full=False)
    assert plain["q"].hessian is None and torch.allclose(plain["q"].sq_norms,
                                                         stats["q"].sq_norms)


def test_sequential_statistics_see_the_compressed_inputs_and_the_original_ones():
    reference, model, data = QKV(), QKV(), _data()
    with torch.no_grad():
        model.inp.weight.mul_(0.5)  # "compressed" first layer
    stats = collect_statistics(model, reference, ["q"], data, mode="sequential")["q"]
    x = torch.cat([x for x, _ in data])
    with torch.no_grad():
        h_c = torch.relu(model.inp(x)).double()
        h_o = torch.relu(reference.inp(x)).double()
    assert torch.allclose(stats.hessian[0], h_c.T @ h_c / 15, atol=1e-6)
    assert torch.allclose(stats.cross[0], h_o.T @ h_c / 15, atol=1e-6)
    same = collect_statistics(reference, copy.deepcopy(reference), ["q"], data)["q"]
    assert torch.equal(same.cross, same.hessian)


@pytest.mark.parametrize("mode", ["sequential", "sequential-local", "plain"])
def test_run_sequential_fits_groups_in_order_on_the_right_inputs(mode):
    reference, data = QKV(), _data()
    model = copy.deepcopy(reference)
    const = torch.relu(reference.inp.bias.detach()).double()  # what inp gives once zeroed
    seen = []

    def solve(name, view, stats):
        seen.append(name)
        if name == "inp":  # compress the first layer: the inputs after it change
            view.set_matrix(view.matrix() * 0.0)
        elif name in ("q", "k", "v"):
            compressed = torch.allclose(stats.hessian[0], torch.outer(const, const))
            assert compressed == (mode != "plain"), name
            assert (stats.cross is not None) == (mode == "sequential")

    summary = run_sequential(model, reference, NAMES, data, solve, mode=mode)
    assert seen == ["inp", "q", "k", "v", "out"]
    assert summary["layer_groups"] == 3 and summary["not_called"] == ["unused"]


def test_conv_statistics_per_group_and_measured_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU())
    data = [(torch.randn(2, 4, 5, 5), None)]
    with measured() as info:
        stats = collect_statistics(model, model, ["0"], data, mode="plain")["0"]
    assert stats.hessian.shape == (2, 18, 18) and stats.samples == 50
    cols = F.unfold(F.pad(data[0][0], (1, 1, 1, 1)), 3).transpose(1, 2).reshape(50, 36)
    first = cols[:, :18].double()
    assert torch.allclose(stats.hessian[0], first.T @ first / 50, atol=1e-5)
    assert info["seconds"] >= 0 and info["peak_rss_mb"] > 0
    assert info["peak_rss_increase_mb"] >= 0


class Branchy(nn.Module):
    """Batches whose first value is negative skip the middle layer (data-dependent flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if float(x[0, 0]) >= 0:
            h = self.b(h)
        return self.c(h)


def test_batches_that_skip_a_group_do_not_block_the_others():
    # tuple inputs: batches that are not merged into one
    data = [((torch.full((2, 4), 1.0),), None), ((torch.full((2, 4), -1.0),), None),
            ((torch.full((2, 4), 2.0),), None)]
    seen = {}

    def solve(name, view, stats):
        seen[name] = stats.samples

    model = Branchy()
    run_sequential(model, model, ["a", "b", "c"], data, solve, mode="plain")
    assert seen == {"a": 6, "b": 4, "c": 6}


def test_a_failing_fit_or_forward_stops_every_thread_and_is_raised():
    model, data = QKV(), _data(n=4)

    def bad_solve(name, view, stats):
        if name == "k":
            raise ValueError("fit failed")

    with pytest.raises(ValueError, match="fit failed"):
        run_sequential(model, model, NAMES, data, bad_solve, mode="sequential")
    bad = [(x, None) for x, _ in data] + [(torch.randn(5, 7), None)]  # wrong width
    with pytest.raises(RuntimeError):
        run_sequential(model, model, NAMES, bad, lambda *a: None, mode="plain")
    assert not model.inp._forward_pre_hooks  # hooks removed


def test_equal_shaped_batches_run_as_one():
    from netpress.reconstruct.engine import _merged

    a, b = torch.ones(2, 3), torch.zeros(4, 3)
    assert torch.equal(_merged([a, b])[0], torch.cat([a, b]))
    d = _merged([{"ids": a, "mask": a}, {"ids": b, "mask": b}])
    assert len(d) == 1 and d[0]["ids"].shape == (6, 3)
    assert len(_merged([a, torch.ones(2, 4)])) == 2 and len(_merged([(a,), (b,)])) == 2
