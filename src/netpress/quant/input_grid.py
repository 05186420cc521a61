"""Lossless 8-bit model inputs: quantize an image input on the grid its pixels came from.

A CNN is usually fed ``(pixel / 255 - mean_c) / std_c`` with 8-bit pixels: every channel's
values lie on its own lattice ``offset_c + k * step_c``, ``k`` in ``0..255``. A per-tensor
uint8 quantizer cannot follow three different lattices, so it re-rounds every pixel: on the
CIFAR ResNets that noise alone is a fifth of all the activation quantization noise at the
logits. When the calibration inputs lie on such per-channel lattices (:func:`detect_lattice`,
a pure function), :func:`apply_input_grid` rewrites the first layer so its integer input *is*
the pixel index: a float :class:`InputLattice` (zero padding, then ``(x - offset_c) /
step_c``) feeds a quantizer with scale 1 and zero point 0, and the first convolution absorbs
the affine map (``W'[:, c] = W[:, c] * step_c``, ``b' = b + sum W[:, c] * offset_c``, no
padding of its own). The model computes the same function; inputs on the lattice are
quantized exactly, inputs off it are rounded on the finest grid each channel allows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from netpress.export.modules import register_module_type
from netpress.quant.modules import ActQuant

__all__ = ["detect_lattice", "InputLattice", "apply_input_grid", "lattice_quantizers"]

_LEVELS = 256
_TOL = 1e-3  # of a step: float32 rounding of normalized pixels stays far below


def detect_lattice(x: torch.Tensor, levels: int = _LEVELS,
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(offset, step)`` such that every value of channel ``c`` of ``x`` (N, C,
    ...) is ``offset_c + k * step_c`` with integer ``k`` in ``[0, levels)``, or None.

    ``step_c`` comes from the smallest gap between distinct values (refined over the whole
    span); the lattice is centred on the values seen when they span fewer than ``levels``
    points.
    """
    if x.dim() < 2 or not x.is_floating_point():
        return None
    offsets, steps = [], []
    for c in range(x.shape[1]):
        v = torch.unique(x[:, c].detach().double().reshape(-1))
        if v.numel() < 2:
            return None
        gap = float((v[1:] - v[:-1]).min())
        span = round(float(v[-1] - v[0]) / gap)
        step = float(v[-1] - v[0]) / span  # the whole span: float32 rounding averages out
        k = (v - v[0]) / step
        if float((k - k.round()).abs().max()) > _TOL:
            return None
        if span >= levels:
            return None
        offsets.append(float(v[0]) - ((levels - 1 - span) // 2) * step)
        steps.append(step)
    return torch.tensor(offsets), torch.tensor(steps)


class InputLattice(nn.Module):
    """Zero-pad the input (as the first layer did), then map each channel's lattice to the
    integers: ``(x - offset_c) / step_c``."""

    offset: torch.Tensor
    step: torch.Tensor

    def __init__(self, channels: int, padding: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.padding = (int(padding[0]), int(padding[1]))
        self.register_buffer("offset", torch.zeros(channels))
        self.register_buffer("step", torch.ones(channels))

    def extra_repr(self) -> str:
        return f"channels={self.offset.numel()}, padding={self.padding}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.offset.reshape(shape)) / self.step.reshape(shape)


def _first_conv(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, nn.Conv2d] | None:
    """``(input quantizer node, conv node, conv)`` when a model input feeds, through one
    quantizer used only there, a zero-padded Conv2d."""
    for node in gm.graph.nodes:
        if node.op != "placeholder" or len(node.users) != 1:
            continue
        (aq_node,) = node.users
        if aq_node.op != "call_module" or len(aq_node.users) != 1:
            continue
        if not isinstance(gm.get_submodule(str(aq_node.target)), ActQuant):
            continue
        (conv_node,) = aq_node.users
        conv = gm.get_submodule(str(conv_node.target)) if conv_node.op == "call_module" \
            else None
        calls = sum(1 for n in gm.graph.nodes if n.target == conv_node.target)
        if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and calls == 1 \
                and not isinstance(conv.padding, str):
            return aq_node, conv_node, conv
    return None


@torch.no_grad()
def apply_input_grid(gm: nn.Module, inputs: torch.Tensor) -> bool:
    """Rewrite ``gm`` (a graph with frozen activation quantizers and a float first conv) so
    its input is quantized on the lattice of ``inputs``; whether it applied."""
    if not isinstance(gm, fx.GraphModule):
        return False
    found = _first_conv(gm)
    lattice = detect_lattice(inputs) if found is not None else None
    if found is None or lattice is None:
        return False
    aq_node, conv_node, conv = found
    offset, step = (t.to(conv.weight.device) for t in lattice)
    if offset.numel() != conv.in_channels or conv.groups != 1:
        return False
    w = conv.weight.double()
    shift = (w * offset.double().reshape(1, -1, 1, 1)).sum((1, 2, 3))
    conv.weight.copy_((w * step.double().reshape(1, -1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype))
    else:
        conv.bias.add_(shift.to(conv.bias.dtype))
    lattice_mod = InputLattice(conv.in_channels, conv.padding)  # type: ignore[arg-type]
    lattice_mod.offset.copy_(offset)
    lattice_mod.step.copy_(step)
    conv.padding = (0, 0)
    name = "input_lattice"
    gm.add_submodule(name, lattice_mod.to(conv.weight.device))
    src = aq_node.args[0]
    assert isinstance(src, fx.Node)
    with gm.graph.inserting_before(aq_node):
        mapped = gm.graph.call_module(name, (src,))
    aq_node.replace_input_with(src, mapped)
    aq = gm.get_submodule(str(aq_node.target))
    assert isinstance(aq, ActQuant)
    aq.scale.fill_(1.0)
    aq.zero_point.fill_(0)
    gm.graph.lint()
    gm.recompile()
    return True


def lattice_quantizers(gm: nn.Module) -> set[str]:
    """Names of the quantizers that read an :class:`InputLattice` (their grid is the pixel
    index itself: scale 1, zero point 0, which training must leave as it is)."""
    if not isinstance(gm, fx.GraphModule):
        return set()
    out = set()
    for node in gm.graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(
                gm.get_submodule(str(src.target)), InputLattice):
            out.add(str(node.target))
    return out


def _lattice_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, InputLattice)
    return {"channels": m.offset.numel(), "padding": m.padding}


register_module_type(InputLattice, _lattice_spec, InputLattice, name="netpress.InputLattice")
