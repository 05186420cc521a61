"""Surgery: size attributes follow, stale constants are caught, templates take pruned shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netpress.errors import ModelError
from netpress.prune.structured import StructuredPrune, prune_structured
from netpress.prune.surgery import reshape_template, size_attributes
from netpress.testing import state_equal


class Heads(nn.Module):
    """Splits 32 features into heads of 8 with sizes from attributes or from constants."""

    def __init__(self, use_attribute: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.out = nn.Linear(32, 8)
        self.use_attribute = use_attribute
        self.num_heads = 4
        self.all_head_size = 32

    def forward(self, x):
        heads, width = (self.num_heads, self.all_head_size) if self.use_attribute else (4, 32)
        h = self.fc(x).view(x.shape[0], heads, 8)
        h = h * torch.sigmoid(h.sum(-1, keepdim=True))
        return self.out(h.reshape(x.shape[0], width))


def test_head_count_attributes_are_updated():
    model = Heads(use_attribute=True).eval()
    pruned, info = prune_structured(model, StructuredPrune(macs=0.5, round_to=1),
                                    torch.randn(3, 8))
    assert pruned.num_heads == 2 and pruned.all_head_size == 16
    assert info["attributes"] == {"num_heads": 2, "all_head_size": 16}
    assert pruned(torch.randn(3, 8)).shape == (3, 8)


def test_a_literal_size_in_user_code_fixes_what_it_sizes_and_is_named():
    model = Heads(use_attribute=False).eval()
    before = copy.deepcopy(model)
    with pytest.raises(ModelError, match="the literal size 4 in op 'view' in module '<root>'"):
        prune_structured(model, StructuredPrune(macs=0.5, round_to=1), torch.randn(3, 8))
    assert state_equal(model, before)


def test_template_takes_the_pruned_shapes_and_attributes():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (1, 6))}
    pruned, _ = prune_structured(model, StructuredPrune(macs=0.5), x)
    assert pruned.transformer.h[0].attn.split_size < 32
    template = copy.deepcopy(model)
    state = pruned.state_dict()
    changed = reshape_template(template, {k: tuple(v.shape) for k, v in state.items()},
                               size_attributes(pruned))
    assert "transformer.h.0.attn.c_attn.weight" in changed
    template.load_state_dict(state)
    assert template.lm_head.weight is template.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(template(**x).logits, pruned(**x).logits)
