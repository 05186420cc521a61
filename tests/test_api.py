"""compress() end to end on toy models: copies, errors, determinism, data conventions."""

import copy

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.testing import TinyCNN, state_equal, toy_batches


def test_input_model_untouched_and_result_is_a_copy():
    model = TinyCNN()
    before = copy.deepcopy(model)
    data = toy_batches(model=model)
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.6), npr.FineTune(max_steps=3)],
                       train=data, evaluate=data, measure=False)
    assert state_equal(model, before)
    assert res.model is not model
    assert model.training == before.training


def test_inplace_modifies_the_given_model():
    model = TinyCNN()
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.6)], inplace=True,
                       measure=False)
    assert res.model is model and (model.conv2.weight == 0).any()


def test_deterministic_under_seed():
    model = TinyCNN()
    data = toy_batches(model=model)
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.5, schedule="cubic"),
              npr.Distill(max_steps=6, lr=1e-2)]
    a = npr.compress(model, recipe, train=data, seed=3, measure=False).model
    b = npr.compress(model, recipe, train=data, seed=3, measure=False).model
    assert state_equal(a, b)


def test_missing_data_is_named_before_any_work():
    with pytest.raises(npr.DataError, match="Distill.*needs `train=`"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune(), npr.Distill()], measure=False)


def test_empty_loader():
    with pytest.raises(npr.DataError, match="evaluate: the data yielded no batches"):
        npr.compress(TinyCNN(), [npr.GlobalMagnitudePrune()], evaluate=[], measure=False)


def test_loader_that_does_not_fit_the_model():
    bad = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(npr.DataError, match="train: the model fails on the first batch.*"
                                            "\\(4, 3, 32, 32\\)"):
        npr.compress(TinyCNN(), [npr.FineTune()], train=bad, measure=False)


def test_labels_out_of_range():
    bad = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 9]))]
    with pytest.raises(npr.DataError, match="labels range over \\[0, 9\\].*4 classes"):
        npr.compress(TinyCNN(), [npr.FineTune()], train=bad, measure=False)


def test_malformed_batch_and_one_shot_iterator():
    with pytest.raises(npr.DataError, match="batch 0 is a Tensor"):
        npr.compress(TinyCNN(), [npr.FineTune()], train=[torch.randn(2, 1, 8, 8)],
                     measure=False)
    gen = (b for b in toy_batches())
    with pytest.raises(npr.DataError, match="one-shot iterator"):
        npr.compress(TinyCNN(), [npr.FineTune()], train=gen, measure=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(bad):
    model = TinyCNN()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = bad
    before = copy.deepcopy(model)
    with pytest.raises(npr.ModelError, match="'conv2.weight' holds 1 NaN/Inf"):
        npr.compress(model, [npr.GlobalMagnitudePrune()], measure=False)
    torch.testing.assert_close(model.state_dict(), before.state_dict(), rtol=0, atol=0,
                               equal_nan=True)  # untouched, NaN/Inf included


def test_not_a_module():
    with pytest.raises(npr.ModelError, match="takes an nn.Module"):
        npr.compress("resnet", [npr.GlobalMagnitudePrune()])  # type: ignore[arg-type]


class KwModel(nn.Module):
    """Takes keyword inputs, as transformers models do, and returns an output object."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 16)
        self.cls = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1)
        return {"logits": self.cls(h.mean(1))}


def test_dict_inputs_and_output_objects():
    g = torch.Generator().manual_seed(0)
    batches = [({"input_ids": torch.randint(0, 20, (4, 6), generator=g),
                 "attention_mask": torch.ones(4, 6)}, torch.randint(0, 3, (4,), generator=g))
               for _ in range(3)]
    res = npr.compress(KwModel(), [npr.GlobalMagnitudePrune(sparsity=0.5),
                                   npr.Distill(max_steps=3)], train=batches, evaluate=batches)
    assert 0 <= res.report["agreement"] <= 1
    assert res.report["macs"]["reference"] > 0


def test_report_has_the_documented_keys(tmp_path):
    model = TinyCNN()
    data = toy_batches(model=model)
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8)], evaluate=data,
                       latency_batch_size=8)
    r = res.report
    for path in ("reference.accuracy", "compressed.accuracy", "agreement",
                 "size.reference_bytes", "size.compressed_bytes", "macs.reference",
                 "macs.compressed", "latency.reference_ms", "latency.compressed_ms"):
        cur = r
        for part in path.split("."):
            cur = cur[part]
        assert cur is not None, path
    assert r["reference"]["accuracy"] == 1.0  # labels come from the model itself
    path = res.save_report(tmp_path)
    assert npr.Report.read(tmp_path)["agreement"] == r["agreement"]
    assert "agreement with reference" in (tmp_path / "report.md").read_text()
    assert path.name == "report.json"


def test_save_and_load_round_trip(tmp_path):
    model = TinyCNN()
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8)], measure=False)
    n = res.save(tmp_path / "m.npress")
    assert n == (tmp_path / "m.npress").stat().st_size
    loaded = npr.load(tmp_path / "m.npress")
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), res.model(x))


def test_torch_prune_reparametrised_model_gets_a_clear_error():
    from torch.nn.utils import prune

    model = TinyCNN()
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    with pytest.raises(npr.ModelError, match="prune.remove"):
        npr.compress(model, [npr.GlobalMagnitudePrune()], measure=False)


def test_reference_can_differ_from_the_model():
    original = TinyCNN()
    pruned = npr.compress(original, [npr.GlobalMagnitudePrune(sparsity=0.9)], measure=False).model
    data = toy_batches(model=original)
    res = npr.compress(pruned, [npr.Distill(max_steps=2)], train=data, evaluate=data,
                       reference=original, latency_batch_size=2)
    assert res.report["reference"]["accuracy"] == 1.0  # labels come from the original
    assert state_equal(res.reference, original)


def test_shape_tracing_steps_take_their_example_from_the_data():
    """StructuredPrune needs example_inputs; given data and no example it uses one input of the
    data (as the report always did), as the command line calls it; with neither, an error."""
    model = TinyCNN()
    data = toy_batches(model=model)
    res = npr.compress(model, [npr.StructuredPrune(macs=0.5, round_to=1)], evaluate=data,
                       measure=False)
    assert res.model.conv1.out_channels < model.conv1.out_channels
    x = data[0][0][:1]
    assert res.example_inputs.shape == x.shape and torch.equal(res.example_inputs, x)
    with pytest.raises(npr.DataError, match="example_inputs"):
        npr.compress(model, [npr.StructuredPrune(macs=0.5, round_to=1)], measure=False)
