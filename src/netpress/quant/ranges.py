"""Activation ranges chosen for agreement: ``Quantize(range_search=True)``.

A min-max range never clips but rounds coarsely; a clipped range rounds finely but cuts the
largest values. Which is better for a given quantizer depends on where its error goes, not on
the error itself (an MSE-optimal clip of a residual stream can cost many predictions). So
each quantizer's range is chosen by the first-order change it causes in what decides
predictions: for a classifier, sample ``n``'s top-1 minus top-2 logit ``m_n`` of the
float model, divided by ``max(m_n, floor)`` (a small margin flips first). With ``g_n`` the
gradient of that signal with respect to the quantizer's input ``x_n``, a candidate range
``r`` costs the expected square of ``g_n . (Q_r(x_n) - x_n)`` summed over samples
(:func:`candidate_costs`, a pure function: rounding noise by its expectation, clipping
exactly). Candidates shrink the calibrated min-max range
by the factors in :data:`RATIOS`; every quantizer takes its cheapest one independently (to
first order the quantizers' contributions add). For other outputs the signal is a fixed
random projection of the outputs (its expected square is the output noise energy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from netpress._inputs import call_model, primary_output, token_mask
from netpress.errors import ModelError
from netpress.quant.modules import ActQuant
from netpress.quant.observers import MinMaxObserver, zero_padding
from netpress.quant.primitives import choose_qparams, qrange

__all__ = ["RATIOS", "candidate_costs", "choose_ranges"]

RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)
_FLOOR_QUANTILE = 0.05  # margins below the batch's 5th percentile count as that percentile


def _range(aq: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """The float range ``[lo, hi]`` that ``aq``'s frozen scale and zero point cover."""
    qmin, qmax = aq.qrange
    zp = aq.zero_point.float()
    return (qmin - zp) * aq.scale, (qmax - zp) * aq.scale


def candidate_costs(x: torch.Tensor, grad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    bits: int, *, symmetric: bool = False,
                    ratios: Sequence[float] = RATIOS) -> torch.Tensor:
    """Expected first-order cost of each range ``ratios[k] * [lo, hi]`` (per tensor).

    ``cost[k] = sum_n sum_i g_ni^2 step_k^2 / 12 + sum_n (g_n . c_kn)^2``: rounding noise
    (uniform, independent between elements: its expectation, so the choice does not fit
    the calibration images' particular rounding) plus the clipping error ``c_kn = clamp_k(
    x_n) - x_n`` (a bias, correlated between elements, so projected exactly). ``x`` and
    ``grad`` have the sample on dim 0.
    """
    x, grad = x.detach().float(), grad.detach().float()
    dims = list(range(1, x.dim()))
    g2 = grad.double().pow(2).sum()
    out = torch.zeros(len(ratios), dtype=torch.float64)
    for k, r in enumerate(ratios):
        scale, zp = choose_qparams(lo * r, hi * r, bits, symmetric=symmetric)
        qmin, qmax = qrange(bits, symmetric=symmetric)
        clip = x.clamp(float((qmin - zp) * scale), float((qmax - zp) * scale)) - x
        proj = (grad * clip).sum(dims) if dims else grad * clip
        out[k] = g2 * float(scale) ** 2 / 12 + proj.double().pow(2).sum()
    return out


def _signal(out: torch.Tensor, seed: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar whose per-sample gradients weigh the errors (see the module docstring);
    per-token outputs count at the real tokens ``keep`` marks only."""
    if out.dim() == 2 and out.shape[1] > 1:
        top2 = out.detach().topk(2, 1)
        margin = top2.values[:, 0] - top2.values[:, 1]
        floor = torch.quantile(margin, _FLOOR_QUANTILE).clamp_min(1e-6)
        signal = out.gather(1, top2.indices[:, :1]) - out.gather(1, top2.indices[:, 1:])
        return (signal.squeeze(1) / margin.clamp_min(floor)).sum()
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                       dtype=out.dtype)
    return (out * zero_padding(proj, keep)).sum()


def _taps(gm: fx.GraphModule, names: Sequence[str],
          live: list[tuple[str, torch.Tensor]]) -> list[Any]:
    """Forward hooks keeping each quantizer's first input per batch, its gradient retained."""
    def on_act(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            # a quantizer shared by pass-through ops: its first call is the tensor it rounds
            if isinstance(out, torch.Tensor) and out.requires_grad and \
                    all(n != name for n, _ in live):
                out.retain_grad()
                live.append((name, out))
        return hook

    return [gm.get_submodule(n).register_forward_hook(on_act(n)) for n in names]


def _costs(gm: fx.GraphModule, names: Sequence[str], batches: Sequence[Any],
           ) -> dict[str, torch.Tensor]:
    """Each quantizer's :func:`candidate_costs`, summed over ``batches`` (float passes)."""
    quants = {n: gm.get_submodule(n) for n in names}
    totals: dict[str, torch.Tensor] = {}
    live: list[tuple[str, torch.Tensor]] = []
    hooks = _taps(gm, names, live)
    for aq in quants.values():
        assert isinstance(aq, ActQuant)
        aq.observer = MinMaxObserver()  # observing: the identity, so the pass is float
    try:
        for i, inputs in enumerate(batches):
            live.clear()
            x = inputs.detach().requires_grad_(True) if isinstance(inputs, torch.Tensor) \
                and inputs.is_floating_point() else inputs
            out = primary_output(call_model(gm, x))  # logits of a dict / ModelOutput too
            if not out.is_floating_point():
                raise ModelError(f"Quantize: range_search needs a float output to follow, "
                                 f"the model returned {out.dtype}; pass range_search=False")
            keep = token_mask(inputs)  # padding tokens neither weigh nor are weighed
            _signal(out, i, keep).backward()
            for name, t in live:
                aq = quants[name]
                assert isinstance(aq, ActQuant)
                if t.grad is None:
                    continue
                lo, hi = _range(aq)
                c = candidate_costs(zero_padding(t, keep), zero_padding(t.grad, keep), lo, hi,
                                    aq.bits, symmetric=aq.symmetric)
                totals[name] = totals[name] + c if name in totals else c
            gm.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
        for aq in quants.values():
            assert isinstance(aq, ActQuant)
            aq.observer = None
    return totals


def choose_ranges(gm: fx.GraphModule, names: Sequence[str], batches: Sequence[Any],
                  ) -> dict[str, float]:
    """Clip each frozen quantizer of ``names`` to its cheapest candidate range (in place);
    ``{quantizer: chosen ratio}`` for those that saw gradients."""
    was_training = gm.training
    gm.eval()
    with torch.enable_grad():
        totals = _costs(gm, names, batches)
    gm.train(was_training)
    chosen: dict[str, float] = {}
    with torch.no_grad():
        for name, cost in totals.items():
            aq = gm.get_submodule(name)
            assert isinstance(aq, ActQuant)
            ratio = RATIOS[int(torch.argmin(cost))]
            lo, hi = _range(aq)
            scale, zp = choose_qparams(lo * ratio, hi * ratio, aq.bits,
                                       symmetric=aq.symmetric)
            aq.scale.copy_(scale.reshape(()))
            aq.zero_point.copy_(zp.reshape(()))
            chosen[name] = ratio
    return chosen
