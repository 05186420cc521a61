"""Coverage of structured pruning: netpress and Torch-Pruning on many architectures.

Every model is built from a small config (random weights, nothing downloaded) and pruned to
at most 50% of its MACs. netpress: ``prune_structured(model, StructuredPrune(macs=0.5), x)``
with no data. Torch-Pruning 1.6 (if installed): ``MetaPruner`` with L2 magnitude, the
ratio bisected to the same target, the layers producing the model's outputs ignored (as its
docs ask), ``output_transform`` picking the logits / last hidden state out of
``transformers`` outputs, and no other per-model configuration. A run passes when pruning
completes, the forward runs, the output shape is unchanged and MACs are at most 50%; the
MACs column is the pruned/unpruned ratio. For netpress the table also gives the exactness
check: 30% of every group's units zeroed beforehand, then removed; the largest output change
relative to the output's largest magnitude (float rounding only, ~1e-7, when exact).

    python benchmarks/structured_coverage.py --out benchmarks/results/structured_coverage.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, primary_output
from netpress.measure.macs import count_macs
from netpress.models import build_model
from netpress.prune.structured import StructuredPrune, prune_structured
from netpress.testing import prune_zeroed_units

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=64, num_labels=5)
STAGES = dict(hidden_sizes=[64, 128], depths=[1, 1], num_labels=5)

# name: (kind, config class, model class, config kwargs)
ARCHS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "ResNet": ("image", "ResNetConfig", "ResNetForImageClassification",
               dict(embedding_size=32, **STAGES)),
    "ConvNeXt": ("image", "ConvNextConfig", "ConvNextForImageClassification",
                 dict(num_stages=2, **STAGES)),
    "ConvNeXtV2": ("image", "ConvNextV2Config", "ConvNextV2ForImageClassification",
                   dict(num_stages=2, **STAGES)),
    "RegNet": ("image", "RegNetConfig", "RegNetForImageClassification",
               dict(embedding_size=32, groups_width=16, **STAGES)),
    "MobileNetV1-hf": ("image", "MobileNetV1Config", "MobileNetV1ForImageClassification",
                       dict(depth_multiplier=0.25, image_size=32, num_labels=5)),
    "MobileNetV2-hf": ("image", "MobileNetV2Config", "MobileNetV2ForImageClassification",
                       dict(depth_multiplier=0.25, image_size=32, num_labels=5)),
    "EfficientNet": ("image", "EfficientNetConfig", "EfficientNetForImageClassification",
                     dict(width_coefficient=0.5, depth_coefficient=0.25, image_size=32,
                          hidden_dim=640, num_labels=5)),
    "BiT": ("image", "BitConfig", "BitForImageClassification",
            dict(embedding_size=64, num_groups=8, **STAGES)),
    "ViT": ("image", "ViTConfig", "ViTForImageClassification", VIT),
    "DeiT": ("image", "DeiTConfig", "DeiTForImageClassification", VIT),
    "BEiT": ("image", "BeitConfig", "BeitForImageClassification", VIT),
    "DINOv2": ("image", "Dinov2Config", "Dinov2ForImageClassification", VIT),
    "Swin": ("image", "SwinConfig", "SwinForImageClassification",
             dict(image_size=32, patch_size=4, embed_dim=64, depths=[2, 2], num_heads=[4, 8],
                  window_size=4, num_labels=5)),
    "SegFormer": ("image", "SegformerConfig", "SegformerForImageClassification",
                  dict(num_encoder_blocks=2, hidden_sizes=[64, 128], depths=[2, 2],
                       sr_ratios=[2, 1], num_attention_heads=[2, 4], patch_sizes=[7, 3],
                       strides=[4, 2], mlp_ratios=[4, 4], num_labels=5)),
    "PoolFormer": ("image", "PoolFormerConfig", "PoolFormerForImageClassification",
                   dict(num_encoder_blocks=2, hidden_sizes=[64, 128], depths=[2, 2],
                        patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], num_labels=5)),
    "BERT": ("text", "BertConfig", "BertModel", TEXT),
    "RoBERTa": ("text", "RobertaConfig", "RobertaModel", TEXT),
    "XLM-RoBERTa": ("text", "XLMRobertaConfig", "XLMRobertaModel", TEXT),
    "DistilBERT": ("text", "DistilBertConfig", "DistilBertModel",
                   dict(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)),
    "ALBERT": ("text", "AlbertConfig", "AlbertModel", dict(TEXT, embedding_size=16)),
    "ELECTRA": ("text", "ElectraConfig", "ElectraModel", dict(TEXT, embedding_size=16)),
    "DeBERTa-v2": ("text", "DebertaV2Config", "DebertaV2Model", TEXT),
    "MPNet": ("text", "MPNetConfig", "MPNetModel", TEXT),
    "ConvBERT": ("text", "ConvBertConfig", "ConvBertModel", dict(TEXT, embedding_size=32)),
    "ModernBERT": ("text", "ModernBertConfig", "ModernBertModel", TEXT),
    "GPT-2": ("text", "GPT2Config", "GPT2LMHeadModel", TEXT),
    "GPT-Neo": ("text", "GPTNeoConfig", "GPTNeoForCausalLM",
                dict(TEXT, num_layers=2, attention_types=[[["global", "local"], 1]])),
    "GPT-J": ("text", "GPTJConfig", "GPTJForCausalLM", dict(TEXT, rotary_dim=4)),
    "GPT-NeoX": ("text", "GPTNeoXConfig", "GPTNeoXForCausalLM", TEXT),
    "OPT": ("text", "OPTConfig", "OPTForCausalLM", dict(TEXT, ffn_dim=64,
                                                         word_embed_proj_dim=32)),
    "BLOOM": ("text", "BloomConfig", "BloomForCausalLM", dict(TEXT, n_layer=2, n_head=4)),
    "Falcon": ("text", "FalconConfig", "FalconForCausalLM", TEXT),
    "Phi": ("text", "PhiConfig", "PhiForCausalLM", TEXT),
    "Llama (GQA)": ("text", "LlamaConfig", "LlamaForCausalLM", dict(TEXT, num_key_value_heads=2)),
    "Mistral (GQA)": ("text", "MistralConfig", "MistralForCausalLM",
                      dict(TEXT, num_key_value_heads=2)),
    "Qwen2 (GQA)": ("text", "Qwen2Config", "Qwen2ForCausalLM", dict(TEXT, num_key_value_heads=2)),
    "Qwen3 (GQA)": ("text", "Qwen3Config", "Qwen3ForCausalLM",
                    dict(TEXT, num_key_value_heads=2, head_dim=8)),
    "Gemma": ("text", "GemmaConfig", "GemmaForCausalLM", dict(TEXT, head_dim=8,
                                                              num_key_value_heads=4)),
    "OLMo": ("text", "OlmoConfig", "OlmoForCausalLM", TEXT),
}
OURS = {"CIFAR ResNet-56 (A)": "cifar_resnet56", "CIFAR ResNet-56 (B)": "cifar_resnet56_b",
        "VGG-16": "vgg16_cifar", "MobileNet-V1": "mobilenet_v1_cifar",
        "MobileNet-V2": "mobilenet_v2_cifar"}


def build(name: str) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    if name in OURS:
        return build_model(OURS[name]).eval(), torch.randn(1, 3, 32, 32)
    import transformers

    kind, cfg_cls, model_cls, kwargs = ARCHS[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(cfg).eval()
    if kind == "image":
        return model, torch.randn(1, 3, 32, 32)
    return model, {"input_ids": torch.randint(1, 100, (1, 12))}


def _out_shape(model: nn.Module, x: Any) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(primary_output(call_model(model, x)).shape)


def _check(pruned: nn.Module, x: Any, shape: tuple[int, ...], base: int) -> dict[str, Any]:
    try:
        got = _out_shape(pruned, x)
    except Exception as exc:
        return {"ok": False, "error": f"forward fails: {type(exc).__name__}: {exc}"[:200]}
    if got != shape:
        return {"ok": False, "error": f"output shape {got} != {shape}"}
    ratio = count_macs(pruned, x) / base
    return {"ok": ratio <= 0.5 + 1e-9, "macs": round(ratio, 3),
            **({} if ratio <= 0.5 + 1e-9 else {"error": "target not reached"})}


def run_netpress(model: nn.Module, x: Any, shape: tuple[int, ...], base: int) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, _ = prune_structured(model, StructuredPrune(macs=0.5), x)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {**_check(pruned, x, shape, base), "seconds": round(time.perf_counter() - t, 3)}


def exactness(model: nn.Module, x: Any, share: float = 0.3) -> float:
    """Zero every coupled slice of ``share`` of each group's units, remove them, and return the
    largest output change relative to the output's largest magnitude (0 = exact)."""
    before, after = prune_zeroed_units(copy.deepcopy(model), x, share)
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))


def _output_layers(model: nn.Module, x: Any, shape: tuple[int, ...]) -> list[nn.Module]:
    """Linear/conv layers whose output width is the model output's last dim (heads)."""
    last = shape[-1]
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == last)
            or (isinstance(m, nn.Conv2d) and m.out_channels == last and len(shape) == 2)]


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def run_torch_pruning(model: nn.Module, x: Any, shape: tuple[int, ...], base: int,
                      limit: int = 120) -> dict[str, Any]:
    """Torch-Pruning to the target, given at most ``limit`` seconds (SIGALRM)."""
    import signal

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        return _run_torch_pruning(model, x, shape, base)
    except _Timeout:
        return {"ok": False, "error": f"no result within {limit} s"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run_torch_pruning(model: nn.Module, x: Any, shape: tuple[int, ...],
                       base: int) -> dict[str, Any]:
    try:
        import torch_pruning as tp
    except ImportError:
        return {"ok": False, "error": "torch-pruning not installed"}

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, round_to=8,
                                      ignored_layers=_output_layers(m, x, shape),
                                      output_transform=primary_output)
        pruner.step()
        return m

    t = time.perf_counter()
    lo, hi, best = 0.0, 0.95, None
    try:
        for _ in range(6):
            mid = (lo + hi) / 2
            trial = prune(mid)
            try:
                ratio = count_macs(trial, x) / base
            except Exception:
                best = trial
                break
            if ratio <= 0.5:
                hi, best = mid, trial
            else:
                lo = mid
        best = best if best is not None else prune(hi)
    except Exception as exc:
        return {"ok": False, "error": f"pruning fails: {type(exc).__name__}: {exc}"[:300]}
    return {**_check(best, x, shape, base), "seconds": round(time.perf_counter() - t, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--peer-timeout", type=int, default=120,
                        help="seconds Torch-Pruning gets per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only or [*OURS, *ARCHS]
    rows: dict[str, Any] = {}
    for name in names:
        try:
            model, x = build(name)
            shape = _out_shape(model, x)
            base = count_macs(model, x)
        except Exception as exc:
            rows[name] = {"build_error": f"{type(exc).__name__}: {exc}"[:200]}
            print(f"{name}: cannot build: {exc}", file=sys.stderr)
            continue
        row: dict[str, Any] = {"netpress": run_netpress(model, x, shape, base)}
        try:
            row["netpress"]["zeroed_units_rel_error"] = exactness(model, x)
        except Exception as exc:
            row["netpress"]["zeroed_units_rel_error"] = f"{type(exc).__name__}: {exc}"[:200]
        if not args.no_peer:
            row["torch_pruning"] = run_torch_pruning(model, x, shape, base, args.peer_timeout)
        rows[name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    exact = r.get("zeroed_units_rel_error")
    note = f"; zeroed-units rel. error {exact:.1e}" if isinstance(exact, float) else ""
    if r.get("ok"):
        return f"ok, {r['macs']:.2f} MACs{note}"
    return f"FAIL: {r.get('error', '')[:70]}{note}"


def table(rows: dict[str, Any]) -> str:
    lines = ["| model | netpress | Torch-Pruning 1.6 |", "|---|---|---|"]
    for name, row in rows.items():
        if "build_error" in row:
            lines.append(f"| {name} | (not built: {row['build_error'][:60]}) | |")
            continue
        lines.append(f"| {name} | {_cell(row.get('netpress'))} | "
                     f"{_cell(row.get('torch_pruning'))} |")
    ok = sum(1 for r in rows.values() if r.get("netpress", {}).get("ok"))
    lines.append(f"\nnetpress: {ok}/{len(rows)} pass")
    return "\n".join(lines)


Runner = Callable[..., dict[str, Any]]

if __name__ == "__main__":
    main()
