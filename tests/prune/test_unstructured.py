"""Unstructured pruning on toy models: exact sparsity, floors, masks kept through recovery."""

import pytest
import torch

import netpress as npr
from netpress.testing import TinyCNN, TinyMLP, TinyResNet, toy_batches, weight_sparsity


def weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d,
                                                                           torch.nn.Linear))}


sparsity = weight_sparsity


def test_global_meets_target_exactly():
    model = TinyResNet()
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8, floor=0.05)],
                       measure=False).model
    total = sum(w.numel() for w in weights(model).values())
    assert sum(int((w == 0).sum()) for w in weights(out).values()) == round(0.8 * total)


def test_global_floor_protects_each_layer():
    model = TinyResNet()
    with torch.no_grad():
        model.head.weight.mul_(1e-4)  # a layer global ranking alone would wipe out
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8, floor=0.1)],
                       measure=False)
    for name, w in weights(out.model).items():
        assert (w != 0).float().mean() >= 0.1 - 1e-9, name
    rec = out.report["steps"][0]
    assert rec["per_layer_sparsity"]["head"] == pytest.approx(0.9, abs=0.01)


def test_layerwise_per_layer_sparsity():
    cfg = npr.LayerwiseMagnitudePrune(sparsity=0.5, per_layer={"fc1": 0.9})
    out = npr.compress(TinyMLP(), [cfg], measure=False).model
    assert (out.fc1.weight == 0).float().mean().item() == pytest.approx(0.9, abs=1e-3)
    assert (out.fc2.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-2)


def test_ignore_and_layers_selection():
    cfg = npr.GlobalMagnitudePrune(sparsity=0.5, ignore=("fc",))
    out = npr.compress(TinyCNN(), [cfg], measure=False).model
    assert int((out.fc.weight == 0).sum()) == 0
    with pytest.raises(npr.SelectionError, match="'re:layer9.*' matches no layer"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(layers=("re:layer9.*",))],
                     measure=False)


def test_impossible_target_with_floor():
    with pytest.raises(npr.RecipeError, match="floors allow"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(sparsity=0.95, floor=0.1)],
                     measure=False)


@pytest.mark.parametrize("recovery", [npr.FineTune, npr.Distill])
def test_masks_stay_applied_through_recovery(recovery):
    model = TinyCNN()
    data = toy_batches(model=model)
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.7), recovery(epochs=3, lr=1e-2)],
                       train=data, measure=False)
    pruned_alone = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.7)], measure=False)
    changed = False
    for name, w in weights(out.model).items():
        ref = weights(pruned_alone.model)[name]
        assert not ((ref == 0) & (w != 0)).any(), f"{name}: a pruned weight came back"
        changed |= not torch.equal(w, ref)
    assert changed, "recovery did not train"
    assert sparsity(out.model) >= 0.7 - 1e-6


def test_cubic_schedule_ramps_during_recovery():
    model = TinyCNN()
    data = toy_batches(model=model)
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.8, schedule="cubic", ramp_end=0.5),
              npr.Distill(max_steps=20)]
    out = npr.compress(model, recipe, train=data, measure=False)
    assert sparsity(out.model) == pytest.approx(0.8, abs=0.01)
    assert out.report["steps"][0]["schedule"] == "cubic"
    assert out.report["steps"][1]["ramped"] == ["GlobalMagnitudePrune"]
    assert out.report["steps"][1]["mask_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_cubic_schedule_without_recovery_is_refused():
    with pytest.raises(npr.RecipeError, match="add FineTune or Distill after it"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(schedule="cubic")], measure=False)


def test_final_model_is_plain():
    out = npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(sparsity=0.5)], measure=False).model
    names = [n for n, _ in out.named_parameters()] + [n for n, _ in out.named_buffers()]
    assert not any("orig" in n or "mask" in n for n in names)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in out.modules())
    assert type(out) is TinyCNN
