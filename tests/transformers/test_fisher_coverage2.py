"""FisherPrune on the transformers classes the second coverage pass (issue 13) fixed: tiny
configs of each, checked by numbers (MACs reached, output shape, finite outputs, relative
output error against the unpruned model)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import netpress as npr
from netpress.errors import NetpressError, RecipeError
from netpress.measure.macs import count_macs

transformers = pytest.importorskip("transformers")


def _ids(batch: int, seed: int, seq: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 512, (batch, seq), generator=gen)}


def _text_data(batches: int = 8) -> list[tuple[dict[str, torch.Tensor], None]]:
    return [(_ids(4, s, seq=16), None) for s in range(batches)]


def _images(batches: int, size: int = 32) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
    """Calibration batches of four random images, the example input and 8 held-out ones."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, size, size, generator=gen), None) for _ in range(batches)]
    return data, data[0][0][:1], torch.randn(8, 3, size, size, generator=gen)


def _out(model: torch.nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return npr._inputs.primary_output(model(**x) if isinstance(x, dict) else model(x))


def _rel(model: torch.nn.Module, ref: torch.nn.Module, x: Any) -> float:
    return float((_out(model, x) - _out(ref, x)).norm() / _out(ref, x).norm())


def _prune(model: torch.nn.Module, x: Any, data: list[Any],
           **kw: Any) -> npr.CompressionResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return npr.compress(model, [npr.FisherPrune(**kw)], calibration=data,
                            example_inputs=x, measure=False)


def _check(res: npr.CompressionResult, model: torch.nn.Module, x: Any, held: Any,
           low: float, high: float) -> float:
    """The MACs fraction lies in [low, high], the held-out outputs keep their shape and are
    finite; returns the relative output error."""
    ratio = count_macs(res.model, x) / count_macs(model, x)
    assert low <= ratio <= high, ratio
    out = _out(res.model, held)
    assert out.shape == _out(model, held).shape and bool(torch.isfinite(out).all())
    return _rel(res.model, model, held)


# --- 5: the MACs reached -------------------------------------------------------------


def test_grouped_query_decoder_lands_within_two_points_of_the_target():
    """A tiny Llama with 2 key/value groups per layer: removing one (4.3% of the MACs) after
    the FFN floors were reached took the model to 45.4% for a 50% target. The selection now
    puts back removed units that fit under the target: 49.7%. (Attention now counts in the
    MACs on CPU too, 2.8% here, so the 50% target cannot be met by FFN cuts alone: a
    key/value group goes, and the output error is 0.37 where the FFN-only selection of the
    count without attention, 51.3% of the MACs with it, had 0.19.)"""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=224,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    res = _prune(model, x, data, macs=0.5)
    assert _check(res, model, x, held, 0.49, 0.5) < 0.4  # 0.368 at 49.7%


def test_sdpa_encoder_no_longer_lands_over_the_target():
    """A tiny BERT (SDPA attention) landed at 50.8% for a 50% target: the graph's estimate,
    scaled to the measured count, counted attention that count_macs did not on CPU. Both
    count it now (the graph's estimate is used as it is)."""
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    res = _prune(model, x, data, macs=0.5)
    plain = _prune(model, x, data, macs=0.5, refit=False)
    assert _check(res, model, x, held, 0.49, 0.5) < 0.012 < 0.02 < _rel(plain.model, model, held)
    # 0.0060 refitted, 0.027 not


# --- 1: readers no gradient reaches ----------------------------------------------------


def test_siglip_unused_pooling_head_is_left_whole_and_the_rest_pruned():
    """SiglipForImageClassification averages the encoder's tokens: the vision model's
    attention-pooling head runs but the logits do not depend on it, so no gradient reached
    its readers and the whole prune was refused. Their units are now left whole, with a
    warning naming them."""
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=512), num_labels=10)
    torch.manual_seed(0)
    model = transformers.SiglipForImageClassification(cfg).eval()
    data, x, held = _images(4)
    with pytest.warns(UserWarning, match=r"left whole.*vision_model\.head\.attention"):
        res = npr.compress(model, [npr.FisherPrune(macs=0.5)], calibration=data,
                           example_inputs=x, measure=False)
    step = res.report["steps"][0]
    assert "vision_model.head.mlp.fc2" in step["unscored"]
    assert not any("head" in g for g in step["groups"])
    plain = _prune(model, x, data, macs=0.5, refit=False)
    # 0.61 refitted, 0.71 not (random weights, 10 labels)
    assert _check(res, model, x, held, 0.48, 0.5) < 0.65 < 0.68 < _rel(plain.model, model, held)


def test_mamba_dt_proj_read_by_its_weight_is_named_in_the_refusal():
    """Mamba computes ``dt_proj.weight @ x`` without calling dt_proj, its only single-reader
    group: no score is possible and the refusal names it and points to StructuredPrune."""
    cfg = transformers.MambaConfig(vocab_size=512, hidden_size=64, state_size=8,
                                   num_hidden_layers=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(cfg).eval()
    with pytest.raises(NetpressError, match=r"(?s)mixer\.dt_proj.*never called as a module"
                                            r".*StructuredPrune"):
        _prune(model, _ids(1, 0), _text_data(2), macs=0.5)


# --- 2 and 4: sizes the model's code builds, stacks that are not chained ----------------


def _segformer_like(cls: Any, config: Any, **kw: Any) -> torch.nn.Module:
    """Two stages, one attention head in the first (as in every Segformer / PvtV2)."""
    cfg = config(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[8, 4], hidden_sizes=[32, 64],
                 patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                 mlp_ratios=[4, 4], num_labels=10, image_size=64, **kw)
    torch.manual_seed(0)
    return cls(cfg).eval()


def test_segformer_single_head_attention_is_left_whole_and_the_rest_pruned():
    """Segformer's first stage has one head: its units are single channels, and cutting
    them changes ``head_dim``, which the code also scales the scores by (no value fits both
    uses). The plan-sizes refusal stopped the whole prune; the groups it names are now left
    whole (warning) and the selection is made again without them."""
    model = _segformer_like(transformers.SegformerForImageClassification,
                            transformers.SegformerConfig, decoder_hidden_size=32)
    data, x, held = _images(4, 64)
    with pytest.warns(UserWarning, match=r"leaving segformer\.stages\.0\.blocks\.0\.attention"
                                         r".*head_dim"):
        res = npr.compress(model, [npr.FisherPrune(macs=0.5)], calibration=data,
                           example_inputs=x, measure=False)
    step = res.report["steps"][0]
    assert list(step["left_whole"]) == ["segformer.stages.0.blocks.0.attention.v_proj.weight"
                                        "[dim 0]"]
    stage0 = res.model.segformer.stages[0].blocks[0]
    assert stage0.attention.v_proj.weight.shape[0] == 32  # whole
    assert stage0.mlp.fc1.weight.shape[0] < 128  # its FFN was cut
    plain = _prune(model, x, data, macs=0.5, refit=False)
    # 0.073 refitted, 0.066 not: here the block refit does not help
    assert _check(res, model, x, held, 0.48, 0.5) < 0.09
    assert _rel(plain.model, model, held) < 0.09


def test_pvt_v2_stage_stack_that_is_not_chained_falls_back_to_the_readers_refit():
    """PvtV2's longest stack of blocks is its stages, which return tuples and reshape in
    between: the block refit ran stage 1 on stage 0's tuple and refused. Stacks whose blocks
    do not take the previous block's output shape are now found out when recorded, and the
    layers reading the pruned units are refitted instead (warning)."""
    model = _segformer_like(transformers.PvtV2ForImageClassification, transformers.PvtV2Config)
    data, x, held = _images(4, 64)
    with pytest.warns(UserWarning, match="not chained.*refit_scope='readers'"):
        res = npr.compress(model, [npr.FisherPrune(macs=0.5)], calibration=data,
                           example_inputs=x, measure=False)
    step = res.report["steps"][0]
    assert step["refit_scope"] == "readers" and step["refitted_layers"] >= 2
    plain = _prune(model, x, data, macs=0.5, refit=False)
    # 0.032 refitted, 0.054 not
    assert _check(res, model, x, held, 0.48, 0.5) < 0.04 < 0.045 < _rel(plain.model, model, held)


# --- the block refit of a group where only some layers have a bias ----------------------


class _GatedBlock(torch.nn.Module):
    """Two layers reading one input, one with a large bias (as xLSTM's gate
    pre-activations beside q/k/v), the bias-free one gated by the other."""

    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Linear(16, 16, bias=False)
        self.gate = torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.gate.bias.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value(x) * torch.exp(-torch.nn.functional.softplus(self.gate(x)))


class _Gated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_GatedBlock(), _GatedBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_block_refit_of_a_mixed_bias_group_keeps_an_exact_model_exact():
    """Refitting a model towards itself must change nothing. The group {value, gate}
    (one input) was fitted without an intercept because value has no bias: gate's fit took
    its bias into its weights and the bias was added again (here a relative output error of
    0.038; xLSTM: 0.0 before the refit, 1.27 after)."""
    from netpress.prune.refit import refit_blocks

    torch.manual_seed(0)
    model = _Gated().eval()
    original = _Gated().eval()
    original.load_state_dict(model.state_dict())
    data = [torch.randn(4, 12, 16) for _ in range(4)]
    done = refit_blocks(model, original, data)
    assert "layers.0.gate" in done and "layers.1.value" in done
    held = torch.randn(4, 12, 16)
    assert _rel(model, original, held) < 1e-4
    gate0, gate1 = model.layers[0].gate, original.layers[0].gate
    assert float((gate0.bias - gate1.bias).detach().abs().max()) < 0.05  # stays near 3.0


def test_mra_refusal_names_the_head_groups_left_whole():
    """Mra builds shapes from ``num_attention_heads`` where no value fits a head cut: its
    head groups are left whole, and 50% cannot then be met; the refusal says which groups
    were left whole and why the rest is out of reach (a PruneCheckError stopped it before);
    75% is met with the FFN neurons alone."""
    cfg = transformers.MraConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=256,
                                 max_position_embeddings=128, block_per_row=4)
    torch.manual_seed(0)
    model = transformers.MraForMaskedLM(cfg).eval()
    x, data, held = _ids(1, 0), _text_data(), _ids(4, 99)
    with pytest.raises(RecipeError, match=r"(?s)cannot be met.*Left whole because their sizes "
                                          r"could not follow \(mra\.encoder\.layer\.0\.attention"):
        _prune(model, x, data, macs=0.5)
    res = _prune(model, x, data, macs=0.75)
    assert "mra.encoder.layer.0.attention.self.query.weight[dim 0]" in \
        res.report["steps"][0]["left_whole"]
    plain = _prune(model, x, data, macs=0.75, refit=False)
    # 0.0040 refitted, 0.022 not
    assert _check(res, model, x, held, 0.73, 0.75) < 0.008 < 0.015 < _rel(plain.model, model,
                                                                          held)
