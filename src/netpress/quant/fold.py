"""Fold eval-mode BatchNorm into the Conv or Linear layer that feeds it.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is the layer with weights
``W * k`` and bias ``(b - mean) * k + beta``, ``k = gamma / sqrt(var + eps)`` per output
channel. The pairs come from the module graph (a Conv/Linear whose only user is the BN, found
with ``torch.fx``); when the model cannot be traced, pairs are taken from sibling names
(``conv1``/``bn1``, ``conv``/``bn``) whose channel counts match, with a warning.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import fx, nn

__all__ = ["fold_bn_pairs", "fold_batchnorm", "fold_into"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    from netpress.export.graph import eval_mode, trace

    with eval_mode(model):
        gm = trace(model)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _NORMS):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        if isinstance(gm.get_submodule(str(src.target)), _LAYERS):
            pairs.append((str(src.target), str(node.target)))
    # a module called twice would be folded twice: keep pairs whose modules appear once
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    return [(c, b) for c, b in pairs if calls.count(c) == 1 and calls.count(b) == 1]


def _named_pairs(model: nn.Module) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    pairs = []
    for name, m in modules.items():
        if not isinstance(m, _NORMS):
            continue
        parent, _, leaf = name.rpartition(".")
        match = re.fullmatch(r"(bn|batchnorm|norm)(.*)", leaf)
        if match is None:
            continue
        for stem in ("conv", "fc", "linear"):
            cand = f"{parent}.{stem}{match.group(2)}" if parent else f"{stem}{match.group(2)}"
            layer = modules.get(cand)
            if isinstance(layer, _LAYERS) and _out_channels(layer) == m.num_features:
                pairs.append((cand, name))
                break
    return pairs


def _out_channels(layer: nn.Module) -> int:
    return int(layer.weight.shape[0])  # type: ignore[union-attr, index]


def fold_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` name pairs whose BN can be folded into the layer."""
    from netpress.errors import ModelError

    try:
        pairs = _traced_pairs(model)
    except ModelError as exc:
        pairs = _named_pairs(model)
        if pairs:
            warnings.warn(f"BatchNorm folding: {exc}; folding by sibling names instead "
                          f"({', '.join(f'{a}+{b}' for a, b in pairs)})", stacklevel=3)
    modules = dict(model.named_modules())
    return [(a, b) for a, b in pairs if _foldable(modules[a], modules[b])]


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    assert isinstance(bn, _NORMS)
    return bn.track_running_stats and bn.running_mean is not None \
        and _out_channels(layer) == bn.num_features


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (its running statistics) into ``layer`` in place; ``bn`` is then redundant."""
    assert isinstance(bn, _NORMS) and isinstance(layer, _LAYERS)
    assert bn.running_mean is not None and bn.running_var is not None
    w = layer.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    k = gamma / torch.sqrt(var + bn.eps)
    out_dim = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0
    shape = [1] * w.dim()
    shape[out_dim] = -1
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    layer.weight.copy_((w.double() * k.reshape(shape)).to(w.dtype))
    new_bias = ((bias - mean) * k + beta).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BN of ``model`` in place (BNs become ``nn.Identity``); the pairs."""
    pairs = fold_bn_pairs(model)
    for layer_name, bn_name in pairs:
        fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        _set(model, bn_name, nn.Identity())
    return pairs
