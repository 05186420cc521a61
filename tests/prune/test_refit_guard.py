"""The block refit's held-out guard (netpress.prune.refit_guard) on planted problems, against
brute-force fits and errors computed row by row."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from netpress.prune._blocks import BlockCalls
from netpress.prune.refit_guard import BlockFits, guard_block, snapshot
from netpress.prune.ridge_cv import FoldSums, fold_fits, ridge_path_errors


class _Residual(nn.Module):
    """``x + fc(x)``: one block whose only layer writes into the residual stream."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Stack(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Residual(d), _Residual(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor,
               lam: float) -> torch.Tensor:
    """``argmin ‖[x 1] Θ − y‖² + λ‖Θ − Θ₀‖²`` as one stacked least-squares problem."""
    xt = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    d = xt.shape[1]
    a = torch.cat([xt, lam ** 0.5 * torch.eye(d, dtype=x.dtype)])
    b = torch.cat([y, lam ** 0.5 * theta0])
    return torch.linalg.lstsq(a, b).solution


def _planted(inputs: int, tokens: int, d: int, nonlinear: float, seed: int
             ) -> tuple[_Stack, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """A two-block stack whose first block is to be checked, one batch of ``inputs``
    sequences of ``tokens`` rows, the targets ``x + x W_oᵀ + nonlinear · sign(x A)`` (a part
    no linear layer can fit) and ``Θ₀`` (the block's weights and bias, ``[d + 1, d]``)."""
    g = torch.Generator().manual_seed(seed)
    model = _Stack(d).double()
    with torch.no_grad():
        w_o = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
        model.blocks[0].fc.weight.copy_(w_o + 0.3 * torch.randn(d, d, generator=g,
                                                                dtype=torch.float64) / d ** 0.5)
        model.blocks[0].fc.bias.zero_()
    x = torch.randn(inputs, tokens, d, generator=g, dtype=torch.float64)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    target = x + x @ w_o.T + nonlinear * torch.sign(x @ a)
    fc = model.blocks[0].fc
    theta0 = torch.cat([fc.weight.detach().T, fc.bias.detach()[None]])
    return model, [x], [target], theta0


def _score(errors: list[torch.Tensor], target: torch.Tensor, q: float = 1.0) -> float:
    """``(Σ_t (e_t / s)^q)^(1/q)`` over the tokens' squared errors, ``s`` the targets' mean
    squared norm per token (one batch)."""
    s = float(target.pow(2).sum(-1).mean())
    e = torch.cat([x.reshape(-1) for x in errors])
    return float((e / s).pow(q).sum()) ** (1 / q)


def _brute(x: torch.Tensor, target: torch.Tensor, theta0: torch.Tensor, damp: float
           ) -> tuple[float, float, list[torch.Tensor], torch.Tensor]:
    """Token by token: the cut block's score, the out-of-fold fits' score (:func:`_score`;
    input ``i`` in fold ``i mod 2``, each fold's rows run with the fit on the other fold,
    absolute ridge ``damp`` times the mean input energy of all rows), the two fold fits and
    the fit on all rows."""
    rows = x.reshape(-1, x.shape[-1])
    lam = damp * float((torch.cat([rows, rows.new_ones(len(rows), 1)], 1) ** 2).sum(0).mean())
    resid = target - x  # the layer's target: what the block adds to its input
    fold = torch.arange(x.shape[0]) % 2
    fits, errors = [], []
    for k in range(2):
        train = resid[fold != k].reshape(-1, x.shape[-1])
        theta = _ridge_fit(x[fold != k].reshape(-1, x.shape[-1]), train, theta0, lam)
        fits.append(theta)
        held = x[fold == k]
        out = held + held @ theta[:-1] + theta[-1]
        errors.append((out - target[fold == k]).pow(2).sum(-1))
    cut = x + x @ theta0[:-1] + theta0[-1]
    full = _ridge_fit(rows, resid.reshape(-1, x.shape[-1]), theta0, lam)
    return (_score([(cut - target).pow(2).sum(-1)], target), _score(errors, target), fits,
            full)


def _guard(model: _Stack, data: list[torch.Tensor], targets: list[torch.Tensor],
           theta0: torch.Tensor, damp: float) -> tuple[Any, dict[str, Any]]:
    """The guard on block 0 at ``q = 1`` (the total squared error, as :func:`_brute` scores),
    its fold fits from the sums (:func:`fold_fits`) as the refit computes them, the block set
    to the fit on all rows first (as the refit leaves it)."""
    block = model.blocks[0]
    calls = BlockCalls.record(model, model.blocks, data)
    x = calls.rows(calls.hidden[0], 0)
    xt = torch.cat([x, x.new_ones(len(x), 1)], 1)
    sums = FoldSums(2)
    ids = torch.arange(data[0].shape[0])[:, None].expand(*data[0].shape[:2]).reshape(-1)
    sums.add(xt, calls.rows(targets[0] - data[0], 0), ids)
    lam = damp * sum(float(h.diagonal().mean()) for h, _ in sums.folds())
    held = fold_fits(sums.folds(), theta0, lam)
    h_all = sum(h for h, _ in sums.folds())
    g_all = sum(g for _, g in sums.folds())
    assert isinstance(h_all, torch.Tensor) and isinstance(g_all, torch.Tensor)
    full = torch.linalg.solve(h_all + lam * torch.eye(len(h_all), dtype=torch.float64),
                              g_all + lam * theta0)
    cut = snapshot(block)
    fits = BlockFits(2, 1.0)
    fits.add(block.fc.weight, [t[:-1].T for t in held])
    fits.add(block.fc.bias, [t[-1] for t in held])
    with torch.no_grad():  # the refit leaves its fit on all rows in the block
        block.fc.weight.data = full[:-1].T.contiguous()
        block.fc.bias.data = full[-1].clone()
    verdict = guard_block(block, 0, calls, targets, cut, fits)
    return verdict, {"held": held, "full": full, "cut": cut}


@pytest.mark.parametrize(("inputs", "nonlinear", "kept"), [(4, 3.0, False), (64, 0.0, True)])
def test_guard_rejects_a_refit_that_over_fits_and_keeps_one_that_helps(
        inputs: int, nonlinear: float, kept: bool) -> None:
    """Planted: a residual block of 16 inputs refitted from 4 sequences of 3 tokens (6 rows
    per fold for 17 unknowns) towards targets dominated by a part no linear layer fits, with
    a tiny ridge: the fit follows the calibration rows and its out-of-fold error score
    exceeds the cut's (ratio 1.08), so the guard gives the block its cut weights back.
    From 64 sequences towards a linear target the refit helps and is kept (the fit on all
    rows stays). Both errors equal
    the brute-force ones (each fold's rows run with a least-squares fit on the other fold's
    rows, scored as :func:`netpress.prune.refit_guard.held_out_error` scores), and so does
    the verdict."""
    model, data, targets, theta0 = _planted(inputs, 3, 16, nonlinear, seed=0)
    damp = 1e-3
    verdict, got = _guard(model, data, targets, theta0, damp)
    err_cut, err_fit, fits, full = _brute(data[0], targets[0], theta0, damp)
    assert verdict is not None
    assert verdict.cut == pytest.approx(err_cut, rel=1e-9)
    assert verdict.refit == pytest.approx(err_fit, rel=1e-6)
    for mine, brute in zip(got["held"], fits):
        torch.testing.assert_close(mine, brute, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got["full"], full, rtol=1e-6, atol=1e-8)
    assert (err_fit < err_cut) is kept
    assert verdict.kept is kept
    fc = model.blocks[0].fc
    if kept:
        assert verdict.ratio < 0.01  # the linear target is fitted
        torch.testing.assert_close(fc.weight.detach(), full[:-1].T)
    else:
        assert verdict.ratio > 1.05  # 1.08: the over-fit refit is worse held out
        assert torch.equal(fc.weight.detach(), theta0[:-1].T)  # the cut's weights back
        assert torch.equal(fc.bias.detach(), theta0[-1])


def test_fold_fits_and_per_fold_errors_match_brute_force() -> None:
    """:func:`fold_fits` is each fold's ridge fit on the rows of the others (3 unequal
    folds), and :func:`ridge_path_errors` per fold sums to its total."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    theta0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ids = torch.arange(50) % 7  # inputs 0..6, folds of 3, 2 and 2 inputs
    sums = FoldSums(3)
    sums.add(x, y, ids)
    lam = 4.0
    fits = fold_fits(sums.folds(), theta0, lam)
    for k, theta in enumerate(fits):
        rows = ids % 3 != k
        a = torch.cat([x[rows], lam ** 0.5 * torch.eye(6, dtype=torch.float64)])
        b = torch.cat([y[rows], lam ** 0.5 * theta0])
        torch.testing.assert_close(theta, torch.linalg.lstsq(a, b).solution)
    per_fold = ridge_path_errors(sums.folds(), theta0, [0.1, lam], per_fold=True)
    assert per_fold.shape == (3, 2)
    torch.testing.assert_close(per_fold.sum(0),
                               ridge_path_errors(sums.folds(), theta0, [0.1, lam]))
    with pytest.raises(ValueError, match="2 folds"):
        fold_fits(sums.folds()[:1], theta0, lam)


def test_guard_keeping_every_block_leaves_the_refit_bit_for_bit(toy_cut: Any,
                                                               held_out_error: Any) -> None:
    """The toy transformer from 32 images: the guard keeps every block's refit (held-out
    block-output error 0.2-0.35 of the cut's), and the weights are those of the refit
    without the guard, bit for bit."""
    from netpress.prune.refit import refit_blocks

    model, cut, data = toy_cut(32)
    plain, guarded_model = copy.deepcopy(cut.model), copy.deepcopy(cut.model)
    refit_blocks(plain, cut.original, data, kept_rows=cut.kept_rows, norms=True,
                 damp="auto", guard=False)
    guarded: dict[str, float] = {}
    refit_blocks(guarded_model, cut.original, data, kept_rows=cut.kept_rows, norms=True,
                 damp="auto", guarded=guarded)
    assert sorted(guarded) == [f"blocks.{i}" for i in range(3)]
    assert all(0.1 < r < 0.5 for r in guarded.values()), guarded
    for (n, p), q in zip(plain.named_parameters(), guarded_model.parameters()):
        assert torch.equal(p, q), n
    assert held_out_error(guarded_model, model) < 0.5 * held_out_error(cut.model, model)


def test_segformer_refit_is_no_worse_than_the_cut_alone() -> None:
    """Segformer (two one-block stages, random weights, 16 random 64x64 images): its block
    refit was worse than the cut alone (relative output error 0.072 against 0.066 on 8
    held-out images); the guard rejects the second stage's refit (held-out error score
    ratio 1.133) and keeps the first (0.995): 0.066, the cut alone's; the rejected layers
    get no ``refit_damp``."""
    import functools
    import warnings

    import transformers

    import netpress as npr
    from netpress.prune import posttraining
    from netpress.prune.refit import refit_blocks

    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[8, 4], hidden_sizes=[32, 64],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[4, 4],
        num_labels=10, image_size=64, decoder_hidden_size=32)
    torch.manual_seed(0)
    model = transformers.SegformerForImageClassification(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 64, 64, generator=gen), None) for _ in range(4)]
    held = torch.randn(8, 3, 64, 64, generator=gen)

    def prune(**kw: Any) -> tuple[float, dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = npr.compress(model, [npr.FisherPrune(macs=0.5, **kw)], calibration=data,
                               example_inputs=data[0][0][:1], measure=False)
        with torch.no_grad():
            ref, out = model(held).logits, res.model(held).logits
        return float((out - ref).norm() / ref.norm()), res.report["steps"][0]

    cut, _ = prune(refit=False)
    guarded, step = prune()
    plain = posttraining.refit_blocks
    posttraining.refit_blocks = functools.partial(  # type: ignore[assignment]
        refit_blocks, guard=False)
    try:
        unguarded, _ = prune()
    finally:
        posttraining.refit_blocks = plain  # type: ignore[assignment]
    assert unguarded > 1.05 * cut, (unguarded, cut)  # the failure the guard fixes
    assert guarded <= 1.005 * cut, (guarded, cut)
    ratios = step["refit_guard"]
    assert sorted(ratios) == ["segformer.stages.0", "segformer.stages.1"]
    rejected = [k for k, r in ratios.items() if r >= 1.0]
    assert "segformer.stages.1" in rejected
    for block in rejected:  # no ridge reported for a layer left as the cut made it
        assert not any(k.startswith(block + ".") for k in step["refit_damp"])
    assert any(k.startswith("segformer.stages.0.") for k in step["refit_damp"]) == \
        ("segformer.stages.0" not in rejected)


@pytest.mark.parametrize("q", [1.0, 4.0])
def test_a_refit_that_wrecks_a_few_tokens_is_rejected_with_a_large_power(q: float) -> None:
    """Planted: the cut block's weights are off everywhere by a little (every token some
    error); the refit's fold fits are exact but for a large weight on a feature only 2 of 64
    tokens carry. Their total squared error is 0.29 of the cut's, but those 2 tokens get 3.5
    times the cut's largest error. With ``q = 1`` (the total squared error) the guard keeps
    the refit; with ``q = 4`` its score (brute force over the tokens) is 2.6 times the cut's
    and the guard rejects it."""
    d, g = 8, torch.Generator().manual_seed(5)
    model = _Stack(d).double()
    w_o = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    x = torch.randn(8, 8, d, generator=g, dtype=torch.float64)
    x[..., -1] = 0.0
    x[0, 3, -1] = x[1, 5, -1] = 1.0  # the rare feature: one token in each fold
    target = x + x @ w_o.T
    small = 0.4 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    rare = torch.zeros(d, d, dtype=torch.float64)
    rare[:, -1] = 1.2
    block = model.blocks[0]
    with torch.no_grad():
        block.fc.weight.copy_(w_o + small)
        block.fc.bias.zero_()
    calls = BlockCalls.record(model, model.blocks, [x])
    cut = snapshot(block)
    fits = BlockFits(2, q)
    fits.add(block.fc.weight, [w_o + rare, w_o + rare])
    fits.add(block.fc.bias, [torch.zeros(d, dtype=torch.float64)] * 2)
    e_cut = (x @ small.T).pow(2).sum(-1)
    e_fit = (x @ rare.T).pow(2).sum(-1)
    assert float(e_fit.sum()) < 0.4 * float(e_cut.sum())  # the mean says: refit
    assert float(e_fit.max()) > 3 * float(e_cut.max())
    verdict = guard_block(block, 0, calls, [target], cut, fits)
    assert verdict is not None
    assert verdict.cut == pytest.approx(_score([e_cut], target, q), rel=1e-9)
    assert verdict.refit == pytest.approx(_score([e_fit], target, q), rel=1e-9)
    if q == 1.0:
        assert verdict.kept and verdict.ratio < 0.3  # 0.29
        return
    assert not verdict.kept and verdict.ratio > 2.0  # 2.63
    assert torch.equal(block.fc.weight.detach(), w_o + small)  # the cut's weights back
