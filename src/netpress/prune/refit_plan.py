"""What the block refit fits, and towards what (:mod:`netpress.prune.refit`).

:func:`plan_linear_groups` lists a block's Linear layers (and, optionally, LayerNorms) in the
order the block calls them, grouping consecutive layers that read one tensor (query / key /
value); :func:`residual_sink` finds where a layer's output is added to a residual stream, by
perturbing the output and watching which later tensor moves by exactly that much.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netpress.reconstruct.layers import is_hf_conv1d, supported

__all__ = ["OUT", "first_tensor", "plan_linear_groups", "residual_sink"]

#: :func:`residual_sink`'s answer when the sum is the block's output
OUT = "<block output>"


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A module call's first input, positional or keyword, if it is a tensor."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    return x if isinstance(x, torch.Tensor) else None


def _fittable(m: nn.Module) -> bool:
    """A Linear or ``transformers`` Conv1D the refit can fit: a subclass of ``nn.Linear``
    (Falcon's ``FalconLinear``, whose forward is its own) is left as it is, as the
    layer-wise reconstruction leaves it (:func:`netpress.reconstruct.layers.supported`)."""
    return (isinstance(m, nn.Linear) and supported(m)) or is_hf_conv1d(m)


def plan_linear_groups(block: nn.Module, run: Callable[[], Any],
                       norms: bool = False) -> list[list[str]]:
    """The block's Linear layers (names inside ``block``) in call order, consecutive layers
    reading the same tensor grouped; layers not called exactly once are left out. With
    ``norms``, its LayerNorm layers too, each a group of its own, in call order."""
    names = [n for n, m in block.named_modules()
             if (norms and isinstance(m, nn.LayerNorm)) or _fittable(m)]
    calls: dict[str, int] = {}
    order: list[tuple[str, torch.Tensor]] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = calls.get(name, 0) + 1
            x = first_tensor(args, kwargs)
            if calls[name] == 1 and x is not None:
                order.append((name, x))
        return fn

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in order:
        if calls[name] != 1:
            continue
        if isinstance(block.get_submodule(name), nn.LayerNorm):
            groups.append([name])
            last = None
        else:
            if groups and last is x:
                groups[-1].append(name)
            else:
                groups.append([name])
            last = x
    return groups


def residual_sink(block: nn.Module, layer: str, run: Callable[[], torch.Tensor]) -> str | None:
    """Where ``layer``'s output is added to another tensor: the name of the module (inside
    ``block``) whose input is that sum, ``"<block output>"`` when the sum is the block's
    output, None when neither (checked by adding a random perturbation to the layer's output
    and finding the first later tensor that moves by exactly it while differing from it)."""
    target = block.get_submodule(layer)
    seen: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"after": False, "delta": None, "y": None}

    def on_layer(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        state["after"], state["y"] = True, out.detach()
        return out + state["delta"] if state["delta"] is not None else None

    def pre(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = first_tensor(args, kwargs)
            if state["after"] and x is not None and name not in seen and \
                    state["y"] is not None and x.shape == state["y"].shape:
                seen[name] = x.detach().clone()
        return fn

    handles = [m.register_forward_pre_hook(pre(n), with_kwargs=True)
               for n, m in block.named_modules() if n and n != layer
               and not n.startswith(layer + ".")]
    handles.append(target.register_forward_hook(on_layer))
    try:
        base_out = run()
        base, y = dict(seen), state["y"]
        if y is None:
            return None
        seen.clear()
        state["after"] = False
        delta = torch.randn(y.shape, generator=torch.Generator().manual_seed(0),
                            dtype=y.dtype) * (float(y.std()) + 1e-3)
        state["delta"] = delta.to(y.device)
        moved_out = run()
    finally:
        for h in handles:
            h.remove()
    candidates = [(n, base[n], seen.get(n)) for n in base]
    candidates.append((OUT, base_out, moved_out))
    tol = 1e-3 * float(delta.norm())
    for name, before, after in candidates:
        if after is None or before.shape != y.shape:
            continue
        if float((after - before - state["delta"]).norm()) <= tol and \
                float((before - y).norm()) > tol:
            return name
    return None
