"""Layer-wise methods after a step that changed layer shapes (structured pruning first).

The original model's layer outputs are no target for thinner layers: the step then fits to
the model it was given (``reconstruct._common.fitting_reference``) instead of failing on
mismatched statistics, and says so in its report."""

import hashlib

import pytest
import torch

import netpress as npr
from netpress.reconstruct._common import shape_mismatch
from netpress.testing import TinyCNN


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _setup():
    torch.manual_seed(0)
    model = TinyCNN(width=16).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 8, 8, generator=g)
    calib = [(x[i:i + 64], None) for i in range(0, 192, 64)]
    held = [(x[192:], None)]
    return model, calib, held


def _digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _mse(a, b, data):
    with torch.no_grad():
        return float(torch.cat([(a(x) - b(x)).pow(2).flatten() for x, _ in data]).mean())


STRUCT = npr.StructuredPrune(macs=0.5, round_to=1, reconstruct=True)


@pytest.mark.parametrize("second", [npr.SparseGPT(sparsity=0.6), npr.Wanda(sparsity=0.6),
                                    npr.GPTQ(bits=3, group_size=None)])
def test_layerwise_after_structured_fits_to_the_pruned_model(second):
    model, calib, held = _setup()
    before = _digest(model)
    pruned = npr.compress(model, STRUCT, calibration=calib, example_inputs=calib[0][0][:1],
                        measure=False).model
    both = npr.compress(model, [STRUCT, second], calibration=calib, example_inputs=calib[0][0][:1],
                        measure=False)
    assert _digest(model) == before  # the user's model is untouched
    step = both.report["steps"][1]
    assert step["fitted_to"].startswith("the model this step was given")
    assert "'conv1'" in step["fitted_to"]  # names the first layer whose shape changed
    # the second step compressed the pruned model's layers, not the original's
    assert both.model.conv2.in_channels == pruned.conv2.in_channels < model.conv2.in_channels
    assert torch.isfinite(torch.cat([both.model(x) for x, _ in held])).all()
    if isinstance(second, npr.SparseGPT):  # it fitted the thinner layers to their own outputs
        wanda = npr.compress(model, [STRUCT, npr.Wanda(sparsity=0.6)], calibration=calib,
                             example_inputs=calib[0][0][:1], measure=False).model
        sgpt_err, wanda_err = _mse(both.model, pruned, held), _mse(wanda, pruned, held)
        assert sgpt_err < 0.8 * wanda_err, (sgpt_err, wanda_err)


def test_unchanged_shapes_fit_to_the_original_model():
    model, calib, _ = _setup()
    res = npr.compress(model, npr.SparseGPT(sparsity=0.5), calibration=calib,
                       example_inputs=calib[0][0][:1], measure=False)
    assert res.report["steps"][0]["fitted_to"] == "the original model"


def test_shape_mismatch_names_the_layer():
    model, calib, _ = _setup()
    pruned = npr.compress(model, STRUCT, calibration=calib, example_inputs=calib[0][0][:1],
                        measure=False).model
    assert shape_mismatch(model, model, ["conv1", "conv2", "fc"]) is None
    why = shape_mismatch(pruned, model, ["conv1", "conv2", "fc"])
    assert why is not None and "conv1" in why
    assert "not in the original" in str(shape_mismatch(pruned, torch.nn.Sequential(), ["fc"]))
