"""Removing channels whose weights were zeroed beforehand leaves the outputs unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netpress.graph import analyze
from netpress.models import build_model
from netpress.testing import prune_zeroed_units

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_then_prune(model: nn.Module, x, share: float = 0.4, seed: int = 0) -> None:
    """Zero a random ``share`` of each group's units, then remove them: the outputs must not
    move, and the model must really have fewer parameters."""
    params = sum(p.numel() for p in model.parameters())
    before, after = prune_zeroed_units(model, x, share, seed)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < params


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet20_b", "vgg11_cifar",
                                  "mobilenet_v1_cifar", "mobilenet_v2_cifar"])
def test_cnns(name):
    torch.manual_seed(0)
    model = build_model(name)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    zero_then_prune(model, torch.randn(2, 3, 32, 32))


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))}


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    return BertModel(cfg), {**_ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg), torch.randn(2, 3, 16, 16)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg), _ids()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg), _ids()


@pytest.mark.parametrize("build", [_bert, _vit, _gpt2, _llama], ids=["bert", "vit", "gpt2",
                                                                      "llama-gqa"])
def test_transformers(build):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = build()
    graph = analyze(model.eval(), x)
    heads = [g for g in graph.groups if g.width > 1]
    assert heads, "attention heads should be prunable units"
    zero_then_prune(model, x)


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1 if self.encoder.layers[0].self_attn.batch_first
                                              else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads(batch_first):
    from netpress.prune._attention import split_attention

    torch.manual_seed(0)
    model = _Encoder(batch_first).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    with torch.no_grad():
        before = model(x)
    assert split_attention(model, x) == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    graph = analyze(model, x)
    assert sum(1 for g in graph.groups if g.width == 8) == 2  # 4 heads of 8 in each layer
    zero_then_prune(model, x)


class _WeightStandardized(nn.Module):
    """BiT-style convs whose weights are standardised over their input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        w = self.b.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True).reshape_as(w)
        y = F.conv2d(F.relu(self.a(x)), w, self.b.bias, padding=1)
        return self.head(F.relu(y).mean((2, 3)))


def test_weight_standardisation_keeps_the_standardised_inputs():
    torch.manual_seed(0)
    model = _WeightStandardized().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = analyze(model, x)
    # a's channels feed b's standardisation statistics: removable, but inexact
    assert [(g.name, g.exact) for g in graph.groups] == [("b.weight[dim 0]", True),
                                                         ("b.weight[dim 1]", False)]
    zero_then_prune(model, x)  # the exact group only
