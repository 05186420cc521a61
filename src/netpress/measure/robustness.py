"""Robustness of a reference and a compressed classifier, side by side.

Two perturbations, both in the units of the model's inputs and scaled by the standard
deviation ``std`` of the clean inputs (measured on the first batch unless given):

* Gaussian noise ``x + level * std * N(0, 1)`` at each of ``noise_levels`` (the same noisy
  inputs for both models, from a fixed seed);
* FGSM (Goodfellow et al. 2015), ``x + eps * std * sign(grad_x CE(model(x), y))``, a
  white-box attack on each model with its own gradient, at each of ``fgsm_eps``.

For each condition the section gives both models' accuracy and the agreement of their
top-1 predictions. Under noise the two models see the same input; under FGSM, agreement is
measured on the inputs crafted against the *compressed* model (both models are run on them),
while each model's accuracy is under the attack on itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import call_model, primary_output
from netpress.errors import DataError
from netpress.measure.collect import evaluating, model_device

__all__ = ["NOISE_LEVELS", "FGSM_EPS", "gaussian_noise", "fgsm", "robustness_section"]

NOISE_LEVELS = (0.1, 0.25, 0.5)
FGSM_EPS = (0.02,)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``x + sigma * N(0, 1)`` (noise drawn on the CPU from ``generator``, then moved)."""
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return x + sigma * noise.to(device=x.device, dtype=x.dtype)


def fgsm(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """The fast gradient sign attack: ``x + eps * sign(grad_x CE(model(x), labels))``.

    Gradients flow only into the input copy; the model's parameters get none.
    """
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            xa = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(primary_output(call_model(model, xa)).float(), labels)
            (grad,) = torch.autograd.grad(loss, xa)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return (x + eps * grad.sign()).detach()


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return primary_output(call_model(model, x)).argmax(-1).cpu()


class _Tally:
    def __init__(self) -> None:
        self.n = 0
        self.ref = self.cmp = self.agree = 0

    def add(self, ref: torch.Tensor, cmp: torch.Tensor, agree: torch.Tensor,
            y: torch.Tensor) -> None:
        self.n += int(y.numel())
        self.ref += int((ref == y).sum())
        self.cmp += int((cmp == y).sum())
        self.agree += int(agree.sum())

    def row(self, **key: float) -> dict[str, Any]:
        n = max(1, self.n)
        return {**key, "reference_accuracy": self.ref / n, "compressed_accuracy": self.cmp / n,
                "agreement": self.agree / n, "n": self.n}


def robustness_section(reference: nn.Module, compressed: nn.Module, data: Iterable[Any], *,
                       noise_levels: Sequence[float] = NOISE_LEVELS,
                       fgsm_eps: Sequence[float] = FGSM_EPS, std: float | None = None,
                       seed: int = 0, max_batches: int | None = None) -> dict[str, Any]:
    """Accuracy and agreement of both models on clean, noisy and FGSM inputs, JSON-ready.

    ``data`` yields ``(image tensor, class labels)`` batches; both models must be on the same
    device. Rows: ``clean``, ``noise`` (one per level) and ``fgsm`` (one per eps), each with
    ``reference_accuracy``, ``compressed_accuracy``, ``agreement`` and ``n``.
    """
    device = model_device(compressed)
    gen = torch.Generator().manual_seed(seed)
    clean = _Tally()
    noisy = {lv: _Tally() for lv in noise_levels}
    attacked = {e: _Tally() for e in fgsm_eps}
    with evaluating(reference), evaluating(compressed):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _batch(batch, i)
            x, y = x.to(device), y.to(device).long()
            if std is None:
                std = float(x.float().std()) or 1.0
            yc = y.cpu()
            r, c = _predict(reference, x), _predict(compressed, x)
            clean.add(r, c, r == c, yc)
            for lv, tally in noisy.items():
                xn = gaussian_noise(x, lv * std, gen)
                r, c = _predict(reference, xn), _predict(compressed, xn)
                tally.add(r, c, r == c, yc)
            for e, tally in attacked.items():
                xr = fgsm(reference, x, y, e * std)
                xc = fgsm(compressed, x, y, e * std)
                agree = _predict(reference, xc) == _predict(compressed, xc)
                tally.add(_predict(reference, xr), _predict(compressed, xc), agree, yc)
    if clean.n == 0:
        raise DataError("robustness: the data yielded no batch")
    return {"input_std": std, "scale": "multiples of input_std",
            "clean": clean.row(),
            "noise": [t.row(level=lv) for lv, t in noisy.items()],
            "fgsm": [t.row(eps=e) for e, t in attacked.items()]}


def _batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 \
            or not isinstance(batch[0], torch.Tensor) or not isinstance(batch[1], torch.Tensor):
        raise DataError(f"robustness: batch {index} is not (input tensor, label tensor); the "
                        f"robustness section needs labelled image-like inputs")
    return batch[0], batch[1]
