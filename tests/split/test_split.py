"""Split computing: the cut, the bottleneck, the two-stage training and the deployables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import ModelError, RecipeError, SelectionError
from netpress.models import resnet20
from netpress.split import (
    build_bottleneck,
    cut_model,
    quantize_ste,
    resolve_cut,
    save_split,
    split_section,
    transmitted_bytes,
)
from netpress.testing import TinyCNN, TinyResNet, toy_batches


@pytest.mark.parametrize("at", ["layer1", "layer2", "layer3.0"])
def test_cut_reproduces_the_model(at):
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    cut = cut_model(model, at)
    with torch.no_grad():
        assert torch.equal(cut.tail(cut.head(x)), model(x))
    assert "linear.weight" in dict(cut.tail.named_parameters())
    assert "conv1.weight" in dict(cut.head.named_parameters())


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) + x  # the input crosses any cut


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.a(x))


def test_cuts_that_cannot_work_are_refused():
    with pytest.raises(ModelError, match="also used after it"):
        cut_model(_Skip(), "a")
    with pytest.raises(ModelError, match="called 2 times"):
        cut_model(_Twice(), "a")
    with pytest.raises(SelectionError, match="no module"):
        resolve_cut(_Skip(), "c")
    with pytest.raises(ModelError, match="no module matching"):
        resolve_cut(_Skip(), "re:a|b")


def test_a_pattern_cuts_at_the_first_module_in_forward_order():
    model = TinyResNet()
    assert resolve_cut(model, "re:conv_b|stem") == "stem"  # stem runs first
    assert resolve_cut(TinyCNN(), "re:bn1|conv1") == "conv1"


def test_quantize_ste_rounds_forward_and_passes_gradients_inside_the_range():
    z = torch.tensor([-1.0, 0.4, 2.6, 20.0], requires_grad=True)
    q = quantize_ste(z, 15)
    assert q.tolist() == [0.0, 0.0, 3.0, 15.0]
    q.sum().backward()
    assert z.grad is not None and z.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("shape", [(2, 16, 9, 7), (2, 16, 8, 8), (2, 12), (2, 5, 12)])
def test_bottleneck_rebuilds_the_shape(shape):
    bn = build_bottleneck(shape, channels=3, bits=4, stride=2).eval()
    x = torch.randn(*shape)
    assert bn(x).shape == x.shape
    codes = bn.codes(x)
    assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
    assert torch.allclose(bn.decode(codes), bn(x))


def test_a_stride_of_four_stacks_two_halvings():
    bn = build_bottleneck((2, 16, 32, 32), channels=4, bits=3, stride=4).eval()
    strided = [m.stride for m in bn.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert strided == [(2, 2), (2, 2), (1, 1)]
    x = torch.randn(2, 16, 32, 32)
    assert bn.codes(x).shape == (2, 4, 8, 8) and bn(x).shape == x.shape
    odd = build_bottleneck((2, 16, 9, 7), channels=4, bits=3, stride=4).eval()
    assert odd(torch.randn(2, 16, 9, 7)).shape == (2, 16, 9, 7)


def _task() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = TinyCNN(width=8).eval()
    with torch.no_grad():
        model.fc.weight.mul_(8)  # predictions that vary across classes
    return model, toy_batches(n=256, batch=32, model=model)


def test_split_trains_a_faithful_bottleneck_and_exports_it(tmp_path, one_thread):
    model, data = _task()
    x = data[0][0][:1]
    cfg = npr.Split(at="conv1", channels=4, bits=6, stride=1, stage1_steps=30,
                    stage2_steps=30, lr=3e-3)
    res = npr.compress(model, cfg, train=data, evaluate=data, example_inputs=x)
    assert res.report["agreement"] >= 0.9
    sec = res.report["split"]
    assert sec["code_shape"] == [4, 8, 8] and sec["bits"] == 6
    assert 0 < sec["device_macs"] < sec["reference_macs"]
    assert sec["bytes_per_input"]["mean"] < 4 * 8 * 8  # fewer bytes than the raw codes
    assert "## Split computing" in res.report.to_markdown()
    assert "arithmetic-coded" in res.report.to_markdown()
    assert sec["bytes_per_input_arithmetic"]["mean"] <= 4 * 8 * 8 * 6 / 8 + 1
    split = res.model
    paths = save_split(split, tmp_path, x)
    device = npr.load(paths["device"])
    server = npr.load(paths["server"])
    batch = data[1][0]
    with torch.no_grad():
        codes = device(batch)
        assert codes.dtype == torch.uint8
        assert torch.allclose(server(codes), split(batch), atol=1e-5)
    import onnxruntime as ort

    dev = ort.InferenceSession(str(paths["device_onnx"]), providers=["CPUExecutionProvider"])
    srv = ort.InferenceSession(str(paths["server_onnx"]), providers=["CPUExecutionProvider"])
    onnx_codes = dev.run(None, {"input": batch.numpy()})[0]
    assert (np.abs(onnx_codes.astype(int) - codes.numpy().astype(int)) <= 1).mean() > 0.999
    out = srv.run(None, {"input": codes.numpy()})[0]
    assert np.allclose(out, split(batch).detach().numpy(), atol=1e-4)


def test_split_keeps_pruning_masks(one_thread):
    model, data = _task()
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5),
                               npr.Split(at="conv1", channels=4, stride=1, stage1_steps=3,
                                         stage2_steps=3)],
                       train=data, measure=False)
    split = res.model
    assert float((split.tail.conv2.weight == 0).float().mean()) >= 0.4
    assert float((split.head.conv1.weight == 0).float().mean()) >= 0.1


def test_a_frozen_head_keeps_its_weights_and_batchnorm_statistics(one_thread):
    model, data = _task()
    res = npr.compress(model, npr.Split(at="bn1", channels=4, stride=1, stage1_steps=3,
                                        stage2_steps=3, train_head=False),
                       train=data, measure=False)
    head = dict(res.model.head.state_dict())
    for name, value in model.state_dict().items():
        if name.startswith(("conv1.", "bn1.")):
            assert torch.equal(head[name], value), name
    assert not torch.equal(res.model.tail.conv2.weight, model.conv2.weight)  # the tail trained


def test_stage2_trains_only_the_parts_it_names(one_thread):
    model, data = _task()
    res = npr.compress(model, npr.Split(at="conv1", channels=4, stride=1, stage1_steps=0,
                                        stage2_steps=3, stage2_trains=("encoder",), alpha=1.0),
                       train=data, measure=False)
    split = res.model
    assert torch.equal(split.tail.conv2.weight, model.conv2.weight)  # the tail stayed
    assert torch.equal(split.head.conv1.weight, model.conv1.weight)  # no stage 1: head too
    enc = split.bottleneck.encoder
    assert enc[1].num_batches_tracked > 0  # the encoder trained (batch statistics moved)
    dec_bn = split.bottleneck.decoder[1]
    assert int(dec_bn.num_batches_tracked) == 0 and torch.all(dec_bn.running_mean == 0)
    with pytest.raises(RecipeError, match="stage2_trains"):
        npr.Split(stage2_trains=("server",))
    with pytest.raises(RecipeError, match="stage2_trains"):
        npr.Split(stage2_trains="tail")
    with pytest.raises(RecipeError, match="stage1_steps"):
        npr.Split(stage1_steps=-1)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("head_bn", ["train", "frozen"])
def test_a_trained_head_keeps_its_batchnorm_statistics_only_when_asked(one_thread, stage,
                                                                       head_bn):
    model, data = _task()
    steps = {"stage1_steps": 3, "train_head": True} if stage == 1 else {
        "stage1_steps": 0, "stage2_trains": ("head", "decoder", "tail")}
    res = npr.compress(model, npr.Split(at="bn1", channels=4, stride=1, stage2_steps=3,
                                        alpha=1.0, head_bn=head_bn, **steps),
                       train=data, measure=False)
    head, bn = res.model.head, model.bn1
    assert float((head.conv1.weight - model.conv1.weight).detach().abs().max()) > 1e-4
    assert float((head.bn1.weight - bn.weight).detach().abs().max()) > 1e-4  # BN affine too
    kept = torch.equal(head.bn1.running_mean, bn.running_mean) and torch.equal(
        head.bn1.running_var, bn.running_var)
    assert kept == (head_bn == "frozen")
    moved = int(head.bn1.num_batches_tracked) - int(bn.num_batches_tracked)
    assert moved == (0 if head_bn == "frozen" else 3)  # three training batches, none more
    with pytest.raises(RecipeError, match="head_bn"):
        npr.Split(head_bn="eval")


def test_a_shared_frozen_head_trains_exactly_as_the_full_model(one_thread, monkeypatch):
    import netpress.split.method as method

    model, data = _task()
    cfg = npr.Split(at="bn1", channels=4, stride=1, stage1_steps=4, stage2_steps=4,
                    train_head=False, stage2_trains=("encoder", "decoder", "tail"), rate=0.01)
    torch.manual_seed(1)
    fast = npr.compress(model, cfg, train=data, measure=False)
    record = fast.report["steps"][0]
    assert record["stage1"]["shared_head"] and record["stage2"]["shared_head"]
    monkeypatch.setattr(method, "_shared_head", lambda *a: False)
    torch.manual_seed(1)
    slow = npr.compress(model, cfg, train=data, measure=False)
    x = data[0][0]
    with torch.no_grad():
        assert torch.allclose(fast.model(x), slow.model(x), atol=1e-4)
    for name, value in slow.model.state_dict().items():
        assert torch.allclose(fast.model.state_dict()[name].float(), value.float(),
                              atol=1e-4), name


def test_bytes_per_input_is_zstd_of_each_codes_array():
    import zstandard

    codes = [np.zeros((4, 4), dtype=np.uint8), np.arange(16, dtype=np.uint8).reshape(4, 4)]
    sent = transmitted_bytes(codes)
    for c, n in zip(codes, sent):
        frame = zstandard.ZstdCompressor(level=19, write_checksum=False,
                                         write_content_size=False).compress(c.tobytes())
        assert n == len(frame)
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == c.tobytes()


def test_split_section_against_png_and_with_a_dictionary():
    model, data = _task()
    res = npr.compress(model, npr.Split(at="conv1", channels=2, stride=2, stage1_steps=2,
                                        stage2_steps=2), train=data, measure=False)
    sec = split_section(model, res.model, data, train=data, example_inputs=data[0][0][:1],
                        latency_repeats=2)
    assert sec["inputs"] == 256 and sec["code_values"] == 2 * 4 * 4
    assert sec["input_png_bytes"]["mean"] > 60  # an 8x8 grey PNG
    assert sec["bytes_per_input_with_dictionary"]["mean"] <= sec["bytes_per_input"]["mean"] + 1
    assert sec["reduction_vs_png"] > 1
    arith = sec["bytes_per_input_arithmetic"]["mean"]
    assert arith <= 2 * 4 * 4 * 8 / 8 + 1  # at most the raw bits of the codes, plus a byte
    assert arith < sec["bytes_per_input"]["mean"]  # no headers: fewer bytes than zstd
    assert "bytes_per_input_context" not in sec  # 8-bit context tables would be too large


def test_split_section_context_coder_for_small_alphabets():
    from netpress.report._toolbox import _split

    model, data = _task()
    res = npr.compress(model, npr.Split(at="conv1", channels=2, bits=2, stride=2,
                                        stage1_steps=2, stage2_steps=2), train=data,
                       measure=False)
    sec = split_section(model, res.model, data, train=data, latency_repeats=2)
    assert sec["context_offsets"] == [[0, 0, -1], [0, -1, 0], [-1, 0, 0]]
    assert sec["context_model_bytes"] == 2 * 2 * 5 ** 3 * 4
    ctx = sec["bytes_per_input_context"]["mean"]
    assert ctx <= 2 * 4 * 4 * 2 / 8 + 1  # at most the raw bits, plus a byte
    assert ctx <= sec["bytes_per_input_arithmetic"]["mean"] + 1  # backs off to per-channel
    assert any("context-coded (2,000-byte context model)" in line for line in _split(sec))


def test_split_settings_are_checked():
    with pytest.raises(RecipeError, match="bits"):
        npr.Split(bits=12)
    with pytest.raises(RecipeError, match="channels"):
        npr.Split(channels=0)
    model, data = _task()
    with pytest.raises(RecipeError, match="cubic"):
        npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5, schedule="cubic"),
                             npr.Split(at="conv1"), npr.FineTune(max_steps=1)],
                     train=data, measure=False)


def test_feature_mismatch_after_structured_change_is_explained():
    model, data = _task()
    x = data[0][0][:1]
    with pytest.raises(ModelError, match="shape"):
        npr.compress(model, [npr.StructuredPrune(macs=0.5, round_to=1),
                             npr.Split(at="conv1", stage1_steps=1, stage2_steps=1)],
                     train=data, example_inputs=x, measure=False)
    assert F is not None
