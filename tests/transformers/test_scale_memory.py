"""Memory cuts of the one-shot transformer methods leave their results unchanged: the
engine's in-place statistics, statistics shared by the layers of a group, FisherPrune's
gradients without weight gradients, and its in-place cut with a shared original."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import netpress as npr
from netpress.prune.fisher import column_mask_grads, unit_fisher
from netpress.prune.posttraining import FisherPrune, _fisher, _readers, fisher_prune
from netpress.reconstruct.engine import LayerStats, run_sequential
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.stats import Accumulator


def _bert(seed: int = 0, kind: type = transformers.BertModel, **extra: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, **extra)
    return kind(cfg).eval()


def _text(n: int = 3, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 3:] = 0  # padding is respected
        out.append({"input_ids": torch.randint(0, 64, (batch, seq), generator=g),
                    "attention_mask": mask})
    return out


def test_accumulator_in_place_sums_are_bit_identical_to_fresh_float64_sums():
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(1, 50, 7, generator=g), torch.randn(1, 50, 9, generator=g))
             for _ in range(3)]
    acc = Accumulator(full=True)
    for cols, orig in parts:
        acc.add(cols, orig)
    got = acc.stats()
    h = cr = sq = None
    for cols, orig in parts:  # the previous implementation: total + part.double(), then / n
        ph, pc = (cols.transpose(1, 2) @ cols).double(), (orig.transpose(1, 2) @ cols).double()
        ps = cols.pow(2).sum(1).double()
        h, cr, sq = (ph, pc, ps) if h is None else (h + ph, cr + pc, sq + ps)
    assert got.samples == 150 and acc.h is None and acc.cross is None  # handed over
    assert torch.equal(got.hessian, h / 150.0) and torch.equal(got.cross, cr / 150.0)
    assert torch.equal(got.sq_norms, sq / 150.0)


class _Fan(nn.Module):
    """Three Linear layers reading one tensor (one group), then one reading their sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 8)
        self.q, self.k, self.v = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6, bias=False)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.tanh(self.q(h)) + self.k(h) * self.v(h))


def test_a_group_shares_statistics_equal_to_brute_force_second_moments():
    model, data = _Fan(), [(torch.randn(6, 5), None) for _ in range(3)]
    work = copy.deepcopy(model)
    got: dict[str, LayerStats] = {}
    run_sequential(work, model, ["q", "k", "v", "out"], data,
                   lambda n, view, s: got.__setitem__(n, s))
    assert got["q"].hessian is got["k"].hessian is got["v"].hessian  # computed once
    with torch.no_grad():
        x = torch.relu(model.inp(torch.cat([x for x, _ in data]))).double()
    torch.testing.assert_close(got["q"].hessian[0], x.T @ x / 18, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["q"].cross[0], x.T @ x / 18, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["q"].mean[0], x.mean(0), rtol=1e-6, atol=1e-7)


def test_each_fit_gets_its_own_stats_and_the_last_one_frees_a_dropped_tensor():
    model, data = _Fan(), [(torch.randn(6, 5), None) for _ in range(3)]
    seen: dict[str, LayerStats] = {}
    first: list[weakref.ref] = []

    def solve(name: str, view: LayerView, stats: LayerStats) -> None:
        assert stats.cross is not None  # not dropped by the group's earlier fits
        if not first:
            first.append(weakref.ref(stats.cross))
        seen[name] = stats
        stats.cross = None  # what GPTQ does once its refit has used it
        if name == "v":  # the group's last fit: nothing else holds the shared cross term
            assert first[0]() is None

    run_sequential(copy.deepcopy(model), model, ["q", "k", "v", "out"], data, solve)
    assert len({id(s) for s in seen.values()}) == 4
    assert seen["q"].hessian is seen["k"].hessian is seen["v"].hessian  # still computed once


def test_sparsegpt_on_a_group_matches_per_layer_fits():
    """Shared statistics give the same weights as each layer fitted alone."""
    model, data = _Fan(), [(torch.randn(16, 5), None) for _ in range(2)]
    res = npr.compress(model, [npr.reconstruct.SparseGPT(sparsity=0.5, layers=("q", "k", "v"))],
                       calibration=data, example_inputs=data[0][0], measure=False)
    for name in ("q", "k", "v"):
        alone = npr.compress(model, [npr.reconstruct.SparseGPT(sparsity=0.5, layers=(name,))],
                             calibration=data, example_inputs=data[0][0], measure=False)
        torch.testing.assert_close(res.model.get_submodule(name).weight,
                                   alone.model.get_submodule(name).weight, rtol=0, atol=0)


def _fisher_brute(model: nn.Module, groups: list, data: list[dict],
                  seed: int) -> dict[int, torch.Tensor]:
    """The scores as before the cut: every parameter takes a gradient too."""
    from netpress._inputs import call_model, primary_output
    from netpress.prune._fisher_pass import _real, _sample_loss

    grads: dict[str, list[torch.Tensor]] = {g.reader: [] for g in groups}
    current: dict = {}

    def hook(name: str):
        def fn(module, args):
            x = args[0]
            x.register_hook(lambda g: grads[name].append(
                column_mask_grads(x.detach(), g, current.get("real"))))
        return fn

    handles = [model.get_submodule(r).register_forward_pre_hook(hook(r)) for r in grads]
    gen = torch.Generator().manual_seed(seed)
    for x in data:
        out = call_model(model, x)
        current["real"] = _real(x, primary_output(out))
        _sample_loss(model, out, x, gen).backward()
    for h in handles:
        h.remove()
    return {g.index: unit_fisher(torch.cat(grads[g.reader]), g.columns) for g in groups}


def _classifier() -> nn.Module:
    return _bert(0, transformers.BertForSequenceClassification, num_labels=5)


def _causal_lm() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_bert, _classifier, _causal_lm],
                         ids=["gaussian", "sampled-labels", "next-token"])
def test_fisher_scores_without_weight_gradients_are_unchanged(make):
    """One sample per backward, no weight gradients: the scores of whole batches with every
    weight taking a gradient (the projections and labels drawn as before)."""
    from netpress.graph import analyze

    model, data = make(), _text()
    graph = analyze(model, data[0])
    groups = _readers(model, graph)
    assert len(groups) >= 4  # heads and FFN neurons of both blocks (+ the pooler)
    fast = _fisher(model, groups, data, seed=3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    brute = _fisher_brute(copy.deepcopy(model), groups, data, seed=3)
    for k in brute:
        assert float(brute[k].abs().max()) > 0
        torch.testing.assert_close(fast[k], brute[k], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scope", ["blocks", "readers"])
def test_in_place_cut_with_a_shared_original_gives_the_same_model(scope):
    model, data = _bert(), _text()
    cfg = FisherPrune(macs=0.6, calibration_batches=3, refit_scope=scope)
    copied, _ = fisher_prune(model, cfg, data[0], data)
    before = copy.deepcopy(model.state_dict())
    work = copy.deepcopy(model)
    inplace, summary = fisher_prune(work, cfg, data[0], data, inplace=True)
    assert inplace is work and summary["refitted_layers"] > 0
    a, b = copied.state_dict(), inplace.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_compress_fisherprune_leaves_the_users_model_alone_and_owns_its_weights():
    model, data = _bert(), _text()
    before = copy.deepcopy(model.state_dict())
    res = npr.compress(model, [FisherPrune(macs=0.6, calibration_batches=3)],
                       calibration=[(x, None) for x in data], example_inputs=data[0],
                       measure=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    mine = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    linears = [m for m in res.model.modules() if isinstance(m, nn.Linear)]
    assert linears and not any(m.weight.untyped_storage().data_ptr() in mine
                               for m in linears)
    with torch.no_grad():
        assert np.isfinite(float(res.model(**data[0]).last_hidden_state.abs().max()))


def test_hinv_cholesky_permuted_inside_is_bit_identical():
    from netpress.reconstruct.obs import hinv_cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64)
    h = x.T @ x / 40
    perm = torch.randperm(9, generator=g)
    kept = h.clone()
    assert torch.equal(hinv_cholesky(h, 0.01, perm=perm), hinv_cholesky(h[perm][:, perm], 0.01))
    assert torch.equal(h, kept)  # the caller's Hessian is not damped in place
    u = hinv_cholesky(h, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(9, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)


def test_fisher_pass_keeps_no_reader_input_alive():
    """The gradient hooks once held their tensor in a cycle through its autograd node."""
    import gc

    from netpress.graph import analyze

    model, data = _bert(), _text()
    groups = _readers(model, analyze(model, data[0]))
    refs: list = []
    handles = [model.get_submodule(g.reader).register_forward_pre_hook(
        lambda m, args: refs.append(weakref.ref(args[0]))) for g in groups]
    _fisher(model, groups, data, seed=0)
    for h in handles:
        h.remove()
    gc.collect()
    assert len(refs) == len(groups) * 12 and all(r() is None for r in refs)


@pytest.mark.parametrize("overwrite", [False, True])
def test_ridge_solve_without_an_identity_matrix_is_bit_identical(overwrite):
    """H + λI formed in one copy (or in H itself) instead of through eye and λ·eye: the same
    values bit for bit, -0.0 off the diagonal included."""
    from netpress.prune.fisher import ridge_solve

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 9, dtype=torch.float64, generator=g)
    h = x.T @ x
    h[0, 3] = h[3, 0] = -0.0
    xty = torch.randn(9, 4, dtype=torch.float64, generator=g)
    theta0 = torch.randn(9, 4, dtype=torch.float64, generator=g)
    lam = 0.01 * float(h.diagonal().mean())
    expected = torch.linalg.solve(h + lam * torch.eye(9, dtype=torch.float64),
                                  xty + lam * theta0)
    given = h.clone()
    got = ridge_solve(given, xty, theta0, 0.01, overwrite=overwrite)
    assert torch.equal(got, expected)
    assert torch.equal(given, h) != overwrite  # damped in place only when allowed
