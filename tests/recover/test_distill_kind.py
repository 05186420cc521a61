"""Distill(loss="auto"): cosine for models that return hidden states, KL for logits."""

import pytest
import torch

import netpress as npr
from netpress.recover.methods import distillation_kind
from netpress.testing import TinyCNN, toy_batches

transformers = pytest.importorskip("transformers")


def _bert(head: bool):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3,
                                     initializer_range=0.5)
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return cls(config).eval()


def _text(n: int = 4, length: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0
    return [({"input_ids": ids, "attention_mask": mask}, None)]


def test_kind_follows_the_output():
    x = _text()[0][0]
    assert distillation_kind(_bert(head=False), x) == "cosine"  # last_hidden_state only
    assert distillation_kind(_bert(head=True), x) == "kl"  # logits
    model = TinyCNN()
    assert distillation_kind(model, toy_batches(model=model)[0][0]) == "kl"  # a tensor
    assert distillation_kind(model, None) == "kl"


def test_auto_distills_an_encoder_by_cosine_and_moves_it_towards_the_reference():
    model, data = _bert(head=False), _text(8, 12)  # wide init: the blocks matter
    recipe = [npr.GlobalMagnitudePrune(sparsity=0.6), npr.Distill(max_steps=30, lr=3e-3)]
    res = npr.compress(model, recipe, train=data, evaluate=data, task="sentence-embedding")
    step = res.report["steps"][-1]
    assert step["loss"] == "cosine"
    pruned = npr.compress(model, recipe[:1], evaluate=data, task="sentence-embedding")
    assert res.report["fidelity"]["cosine_mean"] > pruned.report["fidelity"]["cosine_mean"] + 0.1
    explicit = npr.compress(model, [recipe[0], npr.Distill(max_steps=2, loss="kl")], train=data,
                            measure=False)
    assert explicit.report["steps"][-1]["loss"] == "kl"
