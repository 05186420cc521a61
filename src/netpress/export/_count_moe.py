"""Mixture-of-experts layers whose router hands the experts a Python list of counts.

JetMoE's layers (its feed-forward ``JetMoeMoE`` and its mixture of attention heads
``JetMoeMoA``) route tokens with a ``...TopKGating`` module that counts the tokens per
expert and turns the counts into a Python list (``expert_size.tolist()``); the
``...ParallelExperts`` modules then ``split`` the expert-sorted rows by that list. A trace
records the example's counts as constants, so the exported graph fails (ONNX ``Split``)
or, worse, splits wrongly at any other routing.

:func:`traceable_count_routing` gives the copy being exported (never the user's model):

- each such router a forward that computes the same routing but returns the counts as a
  tensor. It replaces the router's only where it gives the same outputs as the original on
  a probe input (checked here), so a future ``transformers`` whose router computes
  something else is left alone;
- each such experts module a forward that takes the counts as a tensor (or a list) and
  finds each expert's rows in the graph: the rows come sorted by expert, so row ``j``
  belongs to expert ``repeat_interleave(arange(E), counts)[j]``; each expert's rows
  (``NonZero``, zero rows included) go through its weight and back to their places.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["traceable_count_routing"]


def _is_count_router(module: nn.Module) -> bool:
    """A JetMoE-style router; its ``layer`` may be a float or a quantized Linear."""
    return (type(module).__name__.endswith("TopKGating")
            and isinstance(getattr(module, "layer", None), nn.Module)
            and isinstance(getattr(module, "input_size", None), int)
            and isinstance(getattr(module, "top_k", None), int)
            and isinstance(getattr(module, "num_experts", None), int))


def _is_count_experts(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("ParallelExperts")
            and isinstance(weight, torch.Tensor) and weight.dim() == 3
            and isinstance(getattr(module, "num_experts", None), int))


def _router_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """JetMoE's top-k routing with the per-expert counts kept as a tensor."""
    logits = self.layer(hidden_states).float()
    top_logits, top_index = logits.topk(self.top_k, dim=1)
    top_gates = torch.softmax(top_logits, dim=1).type_as(hidden_states)
    counts = F.one_hot(top_index, self.num_experts).sum((0, 1))
    _, order = top_index.flatten().sort(0)
    rows = order.div(self.top_k, rounding_mode="trunc")
    return order, rows, top_gates.flatten()[order], counts, logits


def _experts_forward(self: Any, inputs: torch.Tensor, expert_size: Any) -> torch.Tensor:
    """Rows sorted by expert through their expert's weight; ``expert_size``: the counts."""
    counts = torch.as_tensor(expert_size, device=inputs.device)
    owner = torch.repeat_interleave(torch.arange(self.num_experts, device=inputs.device),
                                    counts)
    out = inputs.new_zeros(inputs.shape[0], self.weight.shape[1])
    for expert in range(self.num_experts):
        rows = torch.where(owner == expert)[0]
        out = out.index_copy(0, rows, F.linear(inputs[rows], self.weight[expert]))
    return out


def _same_routing(router: nn.Module) -> bool:
    """Whether the replacement routes a probe input exactly as the router's own forward."""
    width = router.input_size
    assert isinstance(width, int)  # _is_count_router
    dtype = next((p.dtype for p in router.parameters() if p.is_floating_point()),
                 torch.float32)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(11, width, generator=gen).to(dtype)
    with torch.no_grad():
        want = router(probe)
        got = _router_forward(router, probe)
    if not isinstance(want, tuple) or len(want) != 5:
        return False
    return (torch.equal(torch.as_tensor(want[3]), got[3])
            and all(torch.equal(want[i], got[i]) for i in (0, 1, 2, 4)))


def traceable_count_routing(model: nn.Module) -> list[str]:
    """Patch the count-list routers and their experts in ``model`` (the export's copy);
    returns the names of the modules given a traceable forward."""
    done: list[str] = []
    routers = [(n, m) for n, m in model.named_modules() if _is_count_router(m)]
    if not routers or not all(_same_routing(m) for _, m in routers):
        return done
    for name, module in routers:
        module.forward = types.MethodType(_router_forward, module)  # type: ignore[method-assign]
        done.append(name)
    for name, module in model.named_modules():
        if _is_count_experts(module):
            module.forward = types.MethodType(_experts_forward, module)  # type: ignore[method-assign]
            done.append(name)
    return done
