"""How much arithmetic a forward pass does, in multiply-accumulates (MACs).

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts FLOPs of the
ATen matmul/convolution/attention ops actually executed; MACs are ``FLOPs // 2``.
Attention (``scaled_dot_product_attention``) counts the same on every device and with every
attention implementation: the counter's CUDA formulas count its two products, and
:mod:`netpress.measure._flops` gives the CPU, MPS and out-of-tree kernels the same formula,
so ``attn_implementation="sdpa"`` and ``"eager"`` (plain matmuls) agree. PyTorch's fused
fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (one opaque op) is
switched off while counting, so those modules count their projections and attention too.
Elementwise ops, normalisation and activations count zero, and so do ops the counter
does not know, such as the ``torch.ops.quantized.*`` kernels of ``torch.ao`` quantized
modules. So that int8 models are not reported as free, a Linear- or Conv-like layer
(one with ``in_features``/``out_features``, or ``in_channels``/``kernel_size``) whose
forward the counter saw no FLOPs in is counted analytically from its output shape.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from netpress._inputs import Inputs, move_to
from netpress.measure._flops import EXTRA_FLOPS
from netpress.measure.collect import evaluating, model_device, run_checked
from netpress.measure.size import effective_weight, is_coded
from netpress.select import DEFAULT_PRUNABLE

__all__ = [
    "WEIGHTED_LAYERS",
    "count_macs",
    "count_sparse_macs",
    "layer_macs",
    "macs_breakdown",
    "weight_density",
]

#: Layers whose work scales with their weight density in :func:`count_sparse_macs`.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = DEFAULT_PRUNABLE


def _looks_weighted(module: nn.Module) -> bool:
    linear = all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features"))
    conv = all(hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size"))
    return linear or conv


def _is_weighted(module: nn.Module) -> bool:
    """A Linear/Conv layer, or a look-alike such as a ``torch.ao`` quantized Linear/Conv.

    A look-alike (by its ``in_features``/``in_channels`` attributes) must not contain
    another weighted layer: a block that merely records its widths is not a layer.
    """
    if isinstance(module, WEIGHTED_LAYERS):
        return True
    if not _looks_weighted(module):
        return False
    return not any(
        isinstance(sub, WEIGHTED_LAYERS) or _looks_weighted(sub)
        for sub in list(module.modules())[1:]
    )


def _estimated_flops(module: nn.Module, args: Any, output: Any) -> int:
    """FLOPs of a Linear/Conv-like layer from its attributes and input/output shapes."""
    if not isinstance(output, torch.Tensor):
        return 0
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int):
        return 2 * output.numel() * in_features
    kernel = getattr(module, "kernel_size", 1)
    taps = math.prod(kernel) if isinstance(kernel, (tuple, list)) else int(kernel)
    groups = int(getattr(module, "groups", 1))
    in_channels: Any = getattr(module, "in_channels", 0)
    out_channels: Any = getattr(module, "out_channels", 0)
    if getattr(module, "transposed", False):  # each input element feeds out/groups * taps
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        per_element = int(out_channels) // groups * taps
        return 0 if first is None else 2 * first.numel() * per_element
    return 2 * output.numel() * (int(in_channels) // groups) * taps


def weight_density(module: nn.Module) -> float:
    """Share of nonzero entries in the weight the layer computes with (1.0 without one).

    A coded layer (integer codes or codebook indices, see :mod:`netpress.measure.size`)
    counts the zeros of its dequantized weight, so pruning shows through quantization.
    """
    with torch.no_grad():
        weight = effective_weight(module)
        if weight is None or weight.numel() == 0:
            return 1.0
        return int(torch.count_nonzero(weight)) / weight.numel()


@contextmanager
def _unfused_attention() -> Iterator[None]:
    """PyTorch's native fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoder(Layer)`` (taken in eval mode under ``no_grad``) off for the block:
    it runs projections, attention and feed-forward as ops the FLOP counter has no formula for
    and skips the layers' forward hooks. The regular path computes the same outputs."""
    mha = torch.backends.mha
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def _count(model: nn.Module, example_inputs: Inputs) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward pass and the FLOPs inside each weighted layer.

    Layer FLOPs are read from the counter's running total in forward pre/post hooks, so
    they are attributed to the module object whatever its name; a weighted layer called
    inside another one (a wrapper subclassing ``nn.Linear``) counts towards the outer one.
    """
    per_layer: dict[str, int] = defaultdict(int)
    starts: dict[str, int] = {}
    depth = [0]
    extra = [0]  # estimated FLOPs of layers whose kernels the counter cannot see
    counter = FlopCounterMode(display=False, custom_mapping=dict(EXTRA_FLOPS))

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if depth[0] == 0:
                starts[name] = counter.get_total_flops()
            depth[0] += 1

        return hook

    def post_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            depth[0] -= 1
            if depth[0] == 0:
                seen = counter.get_total_flops() - starts.pop(name)
                if seen == 0:  # a kernel the counter does not know (quantized ops)
                    seen = _estimated_flops(module, args, output)
                    extra[0] += seen
                per_layer[name] += seen

        return hook

    handles = []
    for name, module in model.named_modules():
        if _is_weighted(module):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
    try:
        inputs = move_to(example_inputs, model_device(model))
        with evaluating(model), torch.no_grad(), _unfused_attention(), counter:
            run_checked(model, inputs, "the example inputs")
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() + extra[0], dict(per_layer)


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs of one forward pass of ``model`` on ``example_inputs`` (dense count).

    The model runs in eval mode under ``no_grad``; its training flags are restored.
    A ``Linear(16, 4)`` on a batch of one is 64 MACs.
    """
    total, _ = _count(model, example_inputs)
    return total // 2


def layer_macs(model: nn.Module, example_inputs: Inputs) -> dict[str, int]:
    """Dense MACs spent inside each Linear/Conv(-like) layer, keyed by its qualified name."""
    _, per_layer = _count(model, example_inputs)
    return {name: flops // 2 for name, flops in per_layer.items()}


def _nonzero_flops(model: nn.Module, total: int, per_layer: dict[str, int]) -> int:
    modules = dict(model.named_modules())
    sparse = float(total)
    for name, flops in per_layer.items():
        sparse -= flops * (1.0 - weight_density(modules[name]))
    return max(0, round(sparse))


def count_sparse_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs as a sparse kernel would do them: each Linear/Conv layer's MACs times its density.

    The effective work of a layer whose weight is a fraction ``d`` nonzero is taken as
    ``d`` times its dense MACs; everything outside Linear/Conv layers (attention matmuls,
    functional matmuls) counts dense. This is an idealisation: it assumes zeros are skipped
    at no cost, which real sparse kernels only approach at high sparsity or with structure
    (whole channels removed already shrink the dense count itself). Quantized layers count
    the zeros of their dequantized weights.
    """
    total, per_layer = _count(model, example_inputs)
    return _nonzero_flops(model, total, per_layer) // 2


def macs_breakdown(model: nn.Module, example_inputs: Inputs) -> dict[str, int]:
    """``dense`` (:func:`count_macs`: what dense kernels, such as PyTorch's and ONNX
    Runtime's, execute), ``nonzero`` (:func:`count_sparse_macs`: what is left if a sparse
    kernel skipped every zero weight) and ``coded`` (the dense MACs inside layers whose
    weights are stored as integer codes), from one forward pass."""
    total, per_layer = _count(model, example_inputs)
    modules = dict(model.named_modules())
    coded = sum(flops for name, flops in per_layer.items() if is_coded(modules[name]))
    return {"dense": total // 2, "nonzero": _nonzero_flops(model, total, per_layer) // 2,
            "coded": coded // 2}
