"""LayerNorm re-fit after compression: each LayerNorm's affine parameters re-estimated so its
outputs on the calibration data match the original model's, one closed form per channel.

A LayerNorm computes ``y_c = γ_c · u_c + β_c`` with ``u`` the token's normalised input. After
pruning, ``u`` (from the compressed model's input) no longer matches the original, and the
channel's best affine map to the *original* model's output ``y°_c`` is the least-squares line
``γ_c = Cov(u_c, y°_c) / Var(u_c)``, ``β_c = E[y°_c] - γ_c E[u_c]`` (:func:`affine_fit`).
:func:`refit_layer_norms` does this for every LayerNorm in call order, each one seeing the
model with the earlier ones already re-fitted. A layer-wise method that fits layers to the
original's outputs should re-fit a norm *between* the layers before it and those after it
(:func:`segments`): a norm re-fitted after the layers that read it were fitted moves their
inputs away from what they were fitted on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from netpress._cow import assign_
from netpress._inputs import call_model, move_to, real_tokens, token_mask
from netpress.data import Data, batches
from netpress.errors import ModelError
from netpress.measure.collect import evaluating, model_device

__all__ = ["NormStats", "affine_fit", "norm_names", "segments", "refit_layer_norms"]


class NormStats:
    """Per-channel sums of ``u``, ``u²``, ``y°``, ``u·y°`` over tokens (float64)."""

    def __init__(self, channels: int) -> None:
        self.sums = torch.zeros(4, channels, dtype=torch.float64)
        self.n = 0

    def add(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """``u`` the normalised inputs, ``y`` the target outputs, both (..., channels)."""
        u = u.detach().double().reshape(-1, u.shape[-1])
        y = y.detach().double().reshape(-1, y.shape[-1])
        self.sums += torch.stack([u.sum(0), (u * u).sum(0), y.sum(0), (u * y).sum(0)])
        self.n += u.shape[0]


def affine_fit(stats: NormStats, weight: torch.Tensor, bias: torch.Tensor,
               ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares ``(γ, β)`` per channel; a channel whose ``u`` does not vary keeps its
    ``γ`` and gets the ``β`` that matches the mean (``ridge`` · mean variance guards it)."""
    if stats.n == 0:
        return weight, bias
    mu_u, m_uu, mu_y, m_uy = stats.sums / stats.n
    var = (m_uu - mu_u * mu_u).clamp_min(0)
    cov = m_uy - mu_u * mu_y
    floor = ridge * float(var.mean()) if var.numel() else 0.0
    g0 = weight.detach().double()
    # γ shrunk towards the old value by the tiny ridge: exact for var >> floor
    gamma = torch.where(var > floor, (cov + floor * g0) / (var + floor), g0)
    beta = mu_y - gamma * mu_u
    return gamma.to(weight.dtype), beta.to(bias.dtype)


def _normalised(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(-len(module.normalized_shape), 0))
    x = x.double()
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps)


class _Stop(Exception):
    pass


def _collect(model: nn.Module, name: str, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``inputs`` until module ``name`` has run; its first call's input and
    output."""
    got: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        got.extend((args[0], out))
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise ModelError(f"LayerNorm {name!r} was not called on the calibration data")
    return got[0], got[1]


def norm_names(model: nn.Module, reference: nn.Module) -> list[str]:
    """The LayerNorms of ``model`` a re-fit applies to: affine, over one dimension, present in
    ``reference`` too; in module order."""
    ref_names = {n for n, _ in reference.named_modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)
            and m.elementwise_affine and m.bias is not None
            and len(m.normalized_shape) == 1 and n in ref_names]


def segments(model: nn.Module, layers: Sequence[str],
             norms: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """``layers`` cut at the ``norms`` in module order (taken as the call order): pairs of
    (layers to fit, the norms that follow them), so each norm is re-fitted after the layers
    before it and before those after it read its output."""
    wanted, cut = set(layers), set(norms)
    out: list[tuple[list[str], list[str]]] = [([], [])]
    for name, _ in model.named_modules():
        if name in cut:
            out[-1][1].append(name)
        elif name in wanted:
            if out[-1][1]:
                out.append(([], []))
            out[-1][0].append(name)
    return [seg for seg in out if seg[0] or seg[1]]


def refit_layer_norms(model: nn.Module, reference: nn.Module, data: Data, *,
                      names: Sequence[str] | None = None,
                      max_batches: int | None = None) -> list[str]:
    """Re-fit the affine parameters of ``model``'s LayerNorms (those named, default all with
    affine parameters that ``reference`` also has) to ``reference``'s outputs on ``data``,
    in module order, on the real tokens of text batches. Returns the names re-fitted."""
    if names is None:
        names = norm_names(model, reference)
    device = model_device(model)
    inputs = [move_to(x, device) for i, (x, _) in enumerate(batches(data, name="calibration"))
              if max_batches is None or i < max_batches]
    done = []
    with evaluating(model), evaluating(reference):
        for name in names:
            norm = model.get_submodule(name)
            assert isinstance(norm, nn.LayerNorm)
            stats = NormStats(norm.weight.numel())
            for x in inputs:
                keep = token_mask(x)  # padding positions out of the fit
                stats.add(_normalised(norm, real_tokens(_collect(model, name, x)[0], keep)),
                          real_tokens(_collect(reference, name, x)[1], keep))
            gamma, beta = affine_fit(stats, norm.weight, norm.bias)
            with torch.no_grad():
                assign_(norm.weight, gamma)  # new tensors: copy-on-write (netpress._cow)
                assign_(norm.bias, beta)
            done.append(name)
    return done
