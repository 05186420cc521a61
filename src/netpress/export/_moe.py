"""Mixture-of-experts layers of ``transformers`` in a form the ONNX exporter can trace.

``transformers`` runs the experts of its MoE decoders (Mixtral, Qwen2/3-MoE, OLMoE,
GPT-OSS, GraniteMoe, ... every experts class decorated with ``use_experts_implementation``)
by default with its ``grouped_mm`` implementation: tokens sorted by expert, counted per
expert with ``torch.histc`` and multiplied by ``torch._grouped_mm`` over the offsets. The
TorchScript exporter has no ONNX form for ``histc`` (nor for the grouped matmul), so the
whole model was refused; the eager implementation instead loops in Python over the experts
the example's tokens happened to pick, which a trace would fix into the graph (silently
wrong on other tokens).

:func:`traceable_experts` gives each such experts module of the copy being exported a
forward that visits every expert in a fixed order and picks that expert's tokens in the
graph: the tokens listing expert ``e`` (``torch.where``: ONNX ``NonZero``, a data-dependent
length that ONNX Runtime handles, zero included), their routing weights for it summed over
the top-k slots (a hash router may list an expert twice), the expert's projections on those
rows only, and an ``index_add`` of the weighted rows (each token once per expert). It
computes what the other implementations compute (the same per-row products, only summed in
another order), touches only routed rows (no dense all-experts compute), and the exported
graph holds at any batch size, sequence length and routing.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["traceable_experts", "is_hf_experts"]

_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm",
          "_is_expert_parallel", "num_experts")


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` experts module whose implementation is
    chosen by ``config._experts_implementation`` (``use_experts_implementation``)."""
    config = getattr(module, "config", None)
    return all(hasattr(module, f) for f in _FLAGS) and \
        hasattr(config, "_experts_implementation")


def _project(module: Any, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
    """Rows ``x`` through expert ``expert``'s projection ``name`` (``gate_up_proj``,
    ``up_proj`` or ``down_proj``), with its bias where the module has biases."""
    weight = getattr(module, name)[expert]
    out = x @ weight if module.is_transposed else F.linear(x, weight)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert]
    return out


def _experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert in turn on the rows routed to it (``top_k_index``: ``(tokens, k)``
    expert ids; ``top_k_weights``: their routing weights), summed per token."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in range(int(self.num_experts)):
        picked = top_k_index == expert
        # a token listing an expert twice (hash routing) gets it once, with both weights
        weight = (top_k_weights * picked).sum(-1)
        token = torch.where(picked.any(-1))[0]
        rows = hidden_states[token]
        if self.has_gate:
            mid = self._apply_gate(_project(self, rows, "gate_up_proj", expert))
        else:
            mid = self.act_fn(_project(self, rows, "up_proj", expert))
        rows = _project(self, mid, "down_proj", expert)
        if self.has_post_expert_norm:
            rows = self.post_expert_norm(rows)
        out = out.index_add(0, token, (rows * weight[token].unsqueeze(-1)).to(torch.float32))
    return out.to(hidden_states.dtype)


def _dispatching_class(module: nn.Module) -> type | None:
    """The class in ``module``'s MRO whose ``forward`` is the one ``use_experts_implementation``
    put there (the dispatch to the configured implementation), or None."""
    for cls in type(module).__mro__:
        code = getattr(cls.__dict__.get("forward"), "__code__", None)  # wraps() keeps it
        if "use_experts_implementation" in getattr(code, "co_qualname", ""):
            return cls
    return None


def traceable_experts(model: nn.Module) -> list[str]:
    """Give every ``transformers`` experts module of ``model`` (the copy being exported;
    never the user's model) the traceable forward above; returns their names. Modules in
    expert-parallel mode are left as they are (their sentinel ids are not expert rows).

    Where a subclass wraps the decorated class's forward (Ergo's experts repeat each token
    per route, call ``super().forward`` and apply a per-expert norm and the routing weights
    around it), only the decorated class's forward is replaced: the module's class becomes
    a subclass whose MRO puts the traceable forward right behind the subclass's own, so its
    ``super()`` call lands there."""
    done = []
    for name, module in model.named_modules():
        if not is_hf_experts(module) or module._is_expert_parallel:
            continue
        base = _dispatching_class(module)
        if base is None or base is type(module):
            module.forward = types.MethodType(_experts_forward, module)  # type: ignore[method-assign]
        else:
            shim = type(f"{base.__name__}Traceable", (base,), {"forward": _experts_forward})
            cls = type(module)
            module.__class__ = type(cls.__name__, (cls, shim), {"__module__": cls.__module__})
        done.append(name)
    return done
