"""FisherPrune's within-group choice by group OBS: the maths against brute force, the
Hessians against explicit sums, then the counts and errors on tiny transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netpress.errors import RecipeError
from netpress.prune.obs_rank import reader_hessians, removal_order
from netpress.prune.posttraining import FisherPrune, fisher_cut
from netpress.reconstruct.obs import greedy_unit_order

transformers = pytest.importorskip("transformers")


def _lstsq_error(x: torch.Tensor, w: torch.Tensor, removed: list[int]) -> float:
    """Output error ``‖X Wᵀ - X_k W'ᵀ‖²`` of the best refit from the kept columns."""
    keep = [c for c in range(w.shape[1]) if c not in removed]
    y = x @ w.T
    if not keep:
        return float((y ** 2).sum())
    sol = torch.linalg.lstsq(x[:, keep], y).solution
    return float(((x[:, keep] @ sol - y) ** 2).sum())


def test_removal_order_is_the_greedy_least_squares_order():
    torch.manual_seed(0)
    x = torch.randn(300, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    columns = [np.array([0, 1]), np.array([2]), np.array([3, 4]), np.array([5]),
               np.array([6, 7])]
    order = removal_order(w, x.T @ x, columns, count=3, damp=1e-9)
    removed: list[int] = []
    for unit in order:
        def cost(u: int) -> float:
            return _lstsq_error(x, w, [c for v in [*removed, u] for c in columns[v]])
        best = min((u for u in range(5) if u not in removed), key=cost)
        assert unit == best
        removed.append(unit)
    assert len(order) == 3
    assert removal_order(w, x.T @ x, columns, count=0) == []


def test_greedy_count_is_a_prefix_and_chunks_pay_the_joint_error():
    torch.manual_seed(1)
    x = torch.randn(200, 6, dtype=torch.float64)
    x[:, 3] += x[:, 0]
    w = torch.randn(3, 6, dtype=torch.float64)
    hinv = torch.linalg.inv(x.T @ x)
    units = [torch.tensor([c]) for c in range(6)]
    full, _ = greedy_unit_order([(w, hinv, units)])
    part, _ = greedy_unit_order([(w, hinv, units)], count=4)
    assert part == full[:4]
    # chunk=2: the two cheapest alone go together; the error added is their joint one
    alone = [_lstsq_error(x, w, [u]) for u in range(6)]
    order, added = greedy_unit_order([(w, hinv, units)], count=2, chunk=2)
    assert sorted(order) == sorted(np.argsort(alone)[:2].tolist())
    assert sum(added) == pytest.approx(_lstsq_error(x, w, order), rel=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        greedy_unit_order([(w, hinv, units)], chunk=0)


def _bert(layers: int = 2) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _padded(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[3, 3:] = 0
        out.append({"input_ids": torch.randint(0, 64, (4, 10), generator=gen),
                    "attention_mask": mask})
    return out


def test_reader_hessians_sum_the_real_tokens_in_chunks():
    model = _bert()
    data = _padded(2)
    names = ["encoder.layer.1.output.dense", "encoder.layer.0.attention.output.dense"]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: rows[n].append(a[0].detach())) for n in names]
    with torch.no_grad():
        for x in data:
            model(**x)
    for h in hooks:
        h.remove()
    for budget in (1, 2**30):  # one reader per pass, or all in one pass
        got = dict(reader_hessians(model, names, data, budget=budget))
        assert list(got) == names[::-1]  # forward order
        for n in names:
            real = torch.cat([r[x["attention_mask"].bool()] for r, x in zip(rows[n], data)])
            assert real.shape[0] == 2 * (40 - 4 - 7)
            torch.testing.assert_close(got[n], real.double().T @ real.double())
    with pytest.raises(ValueError, match="no module named"):
        list(reader_hessians(model, ["encoder.nope"], data))


def test_obs_rank_removes_as_many_units_and_fits_the_readers_better():
    """Same counts per group as the Fisher ranking (so the same MACs); each reader's
    least-squares refit error on the calibration tokens is no larger than with the Fisher
    choice, and smaller in total."""
    model = _bert()
    data = _padded(4)
    x = {k: v[:1] for k, v in data[0].items()}
    cuts = {r: fisher_cut(model, FisherPrune(macs=0.6, rank=r, refit=False), x, data)
            for r in ("fisher", "obs")}
    assert cuts["obs"].summary["groups"] == cuts["fisher"].summary["groups"]
    assert cuts["obs"].summary["rank"] == "obs"
    assert cuts["obs"].summary["macs_after"] == cuts["fisher"].summary["macs_after"]
    hess = dict(reader_hessians(cuts["fisher"].original, cuts["fisher"].readers, data))
    total = {}
    for r, cut in cuts.items():
        errors = []
        for name in cut.readers:
            h = hess[name]
            w = cut.original.get_submodule(name).weight.detach().double()
            kept = cut.kept_columns[name]
            removed = sorted(set(range(w.shape[1])) - set(kept.tolist()))
            # output error of the best refit from the kept inputs: w_R (H/H_KK) w_Rᵀ
            hk = h[kept][:, kept] + 1e-9 * torch.eye(len(kept), dtype=torch.float64)
            sol = torch.linalg.solve(hk, h[kept][:, removed])
            schur = h[removed][:, removed] - h[removed][:, kept] @ sol
            errors.append(float((w[:, removed] @ schur * w[:, removed]).sum()))
        total[r] = errors
    assert sum(total["obs"]) < sum(total["fisher"])
    changed = sum(not torch.equal(cuts["obs"].kept_columns[n], cuts["fisher"].kept_columns[n])
                  for n in cuts["obs"].readers)
    assert changed >= 1


def test_rank_is_checked():
    """(Grouped-query attention under the default OBS choice: test_fisher_prune.py.)"""
    with pytest.raises(RecipeError, match="rank"):
        FisherPrune(rank="magnitude")
    assert FisherPrune().rank == "obs"

