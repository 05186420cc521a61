"""L-C and label-preserving recovery on toy models."""

import pytest

import netpress as npr
from netpress.measure import agreement, collect_pair
from netpress.testing import TinyCNN, toy_batches, varied_teacher, weight_sparsity


@pytest.fixture(scope="module")
def task():
    """A teacher with varied predictions (random CNNs with BN predict one class)."""
    model = varied_teacher()
    return model, toy_batches(n=512, batch=32, model=model), toy_batches(n=512, seed=1,
                                                                          model=model)


def test_lc_ends_in_the_compressed_set_and_beats_no_recovery(task):
    model, train, test = task
    prune = npr.GlobalMagnitudePrune(sparsity=0.8)
    plain = npr.compress(model, [prune], measure=False).model
    lc = npr.compress(model, [prune, npr.LC(max_steps=160, iterations=8, lr=5e-3)],
                      train=train, measure=False)
    assert weight_sparsity(lc.model) == pytest.approx(weight_sparsity(plain), abs=1e-6)
    rec = lc.report["steps"][-1]
    assert rec["step"] == "LC" and rec["started_from_reference"] is True
    ref_out, plain_out, _ = collect_pair(model, plain, test)
    _, lc_out, _ = collect_pair(model, lc.model, test)
    assert agreement(ref_out, lc_out) > agreement(ref_out, plain_out) + 0.05


def test_lc_keeps_masks_for_later_recovery(task):
    model, train, _ = task
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.7),
                               npr.LC(max_steps=8, iterations=2),
                               npr.FineTune(max_steps=5, lr=1e-2)], train=train, measure=False)
    assert weight_sparsity(out.model) == pytest.approx(0.7, abs=1e-3)  # round(0.7 * n) weights


def test_lc_needs_a_compression_step_and_oneshot():
    data = toy_batches()
    with pytest.raises(npr.RecipeError, match="LC needs a compression step"):
        npr.compress(TinyCNN(), [npr.LC(max_steps=2)], train=data, measure=False)
    with pytest.raises(npr.RecipeError, match="one-shot"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(schedule="cubic"),
                                 npr.LC(max_steps=2)], train=data, measure=False)


def test_label_preserve_tunes_weights_on_held_out_batches(task):
    model, train, _ = task
    cands = ((0.0, 1.0, 0.0), (1.0, 1.0, 2.0))
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8),
                               npr.LabelPreserve(max_steps=20, candidates=cands, lr=5e-3)],
                       train=train, measure=False)
    rec = out.report["steps"][-1]
    assert len(rec["trials"]) == 2
    best = min(rec["trials"], key=lambda t: (t["mismatches"], -t["kd"]))
    assert rec["weights"] == {k: best[k] for k in ("ce", "kd", "margin")}


def test_label_preserve_fixed_weights_skip_tuning(task):
    model, train, _ = task
    cfg = npr.LabelPreserve(max_steps=5, weights={"ce": 1.0, "kd": 0.5, "margin": 2.0})
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5), cfg], train=train,
                       measure=False)
    assert out.report["steps"][-1]["trials"] == []
    assert out.report["steps"][-1]["weights"] == {"ce": 1.0, "kd": 0.5, "margin": 2.0}
    with pytest.raises(npr.RecipeError, match="unknown weight key"):
        npr.LabelPreserve(weights={"hinge": 1.0})


def test_range_regularization_shrinks_the_weight_range(task):
    model, train, _ = task
    plain = npr.compress(model, [npr.FineTune(max_steps=30, lr=1e-2)], train=train,
                         measure=False).model
    reg = npr.compress(model, [npr.FineTune(max_steps=30, lr=1e-2, range_reg="linf",
                                            range_reg_strength=1.0)], train=train,
                       measure=False).model
    assert reg.fc1.weight.abs().max() < plain.fc1.weight.abs().max()
    with pytest.raises(npr.RecipeError, match="range_reg='l3'"):
        npr.Distill(range_reg="l3")
