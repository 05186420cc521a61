"""Re-estimate BatchNorm statistics after structured pruning ("adaptive BN", EagleEye).

Removing channels changes what flows into every later BatchNorm, most of all when a residual
stream is cut; the running means and variances recorded on the full model no longer fit, and
that mismatch, more than the lost weights, is what collapses a pruned model's accuracy before
recovery. Re-estimating them from a few hundred inputs is a forward pass with no gradients:
on the pretrained CIFAR ResNet-56 at 50% MACs it lifts one-shot accuracy from 13% to 56%
(41% to 77% with the residual stream protected).

Only BatchNorm layers switch to training mode (cumulative averages, ``momentum=None``); the
rest of the model (dropout included) stays in eval mode. Weights are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from netpress._cow import own_
from netpress._inputs import call_model, move_to
from netpress.measure.collect import model_device

__all__ = ["recalibrate_batchnorm"]


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], *, limit: int) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` from the inputs of
    up to ``limit`` ``(inputs, labels)`` batches, in place. Returns the number of batches used
    (0 leaves the statistics as they were)."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or limit < 1:
        return 0
    device = model_device(model)
    saved = {m: (m.momentum, m.training, _copy(m.running_mean), _copy(m.running_var),
                 _copy(m.num_batches_tracked)) for m in norms}
    was_training = model.training
    used, done = 0, False
    try:
        model.eval()
        for m in norms:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    own_(buf)  # updated in place below: never a tensor shared with the caller
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches seen
            m.train()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if i >= limit:
                    break
                call_model(model, move_to(batch[0], device))
                used += 1
        done = True
    finally:
        model.train(was_training)
        for m, (momentum, training, mean, var, tracked) in saved.items():
            m.momentum = momentum
            m.train(training)
            if used == 0 or not done:  # nothing seen, or an error: restore them
                for name, old in (("running_mean", mean), ("running_var", var),
                                  ("num_batches_tracked", tracked)):
                    buf = getattr(m, name)
                    if old is not None and buf is not None:
                        buf.copy_(old)
    return used
