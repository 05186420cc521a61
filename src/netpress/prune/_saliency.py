"""Plumbing between the channel graph and :mod:`.importance`: slices, gradients, data."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.context import Context
from netpress.errors import DataError
from netpress.graph import ChannelGraph
from netpress.prune.importance import (
    DATA_CRITERIA,
    hessian_gradient_product,
    hutchinson_diagonal,
    unit_scores,
)
from netpress.reconstruct.channels import obs_scores

if TYPE_CHECKING:
    from netpress.prune.structured import StructuredPrune

__all__ = ["derivatives", "group_scores", "unit_rows"]


def unit_rows(t: torch.Tensor, dim: int, positions: list[np.ndarray]) -> torch.Tensor:
    """A (units x elements) matrix: unit ``u``'s slice of ``t`` along ``dim``, flattened.

    Units of unequal extent are zero-padded (which leaves sums and norms unchanged).
    """
    moved = t.detach().movedim(dim, 0)
    lens = {len(p) for p in positions}
    if len(lens) == 1:
        idx = torch.from_numpy(np.concatenate(positions)).to(moved.device)
        return moved.index_select(0, idx).reshape(len(positions), -1)
    rows = [moved.index_select(0, torch.from_numpy(p).to(moved.device)).reshape(-1)
            for p in positions]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _batches(ctx: Context, limit: int, owner: str) -> Iterator[tuple[Any, Any]]:
    source = ctx.calibration if ctx.calibration is not None else ctx.train
    if source is None:
        raise DataError(f"{owner} needs `calibration=` (or `train=`) data for a "
                        "data-driven importance; pass it to compress()")
    for i, batch in enumerate(source):
        if i >= limit:
            break
        yield batch[0], batch[1]


def _loss(model: nn.Module, inputs: Any, labels: Any, device: torch.device,
          owner: str) -> torch.Tensor:
    out = primary_output(call_model(model, move_to(inputs, device)))
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
            or out.dim() != 2 or labels.shape[:1] != out.shape[:1]:
        raise DataError(f"{owner}(importance='taylor'/'hessian'/'grad_norm') needs batches of "
                        "(inputs, class labels) for a classifier; use a data-free importance "
                        "(magnitude, l1, l2, bn_scale) for other models")
    return F.cross_entropy(out.float(), labels.to(device).long())


def derivatives(model: nn.Module, params: list[nn.Parameter], importance: str, ctx: Context,
                *, batches: int, owner: str, fp16: bool = False,
                hessian_samples: int = 4) -> list[torch.Tensor]:
    """What a data-driven ``importance`` multiplies the weights with, per param, from the
    first ``batches`` calibration (else train) batches, with the model in eval mode:
    summed gradients (taylor), the Hutchinson Hessian diagonal (hessian) or the exact
    Hessian-gradient product of the summed loss (grad_norm)."""
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    device = params[0].device
    autocast = torch.autocast(device.type, dtype=torch.float16) if fp16 \
        else contextlib.nullcontext()
    if fp16 and device.type == "cpu":
        warnings.warn(f"{owner}(fp16=True) on the CPU: PyTorch has no fast FP16 "
                      "kernels there (measured 6x slower than FP32 for the Hessian of a "
                      "ResNet-56, benchmarks/structured.py hessian); FP16 pays off on CUDA",
                      stacklevel=5)

    def losses() -> Iterator[torch.Tensor]:
        for inputs, labels in _batches(ctx, batches, owner):
            with autocast:
                yield _loss(model, inputs, labels, device, owner)

    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            if importance == "grad_norm":
                return hessian_gradient_product(losses, params)
            return _summed(losses(), params, importance, hessian_samples, ctx.seed)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)


def _derivatives(model: nn.Module, params: list[nn.Parameter], cfg: StructuredPrune,
                 ctx: Context) -> list[torch.Tensor]:
    """:func:`derivatives` with a StructuredPrune config's settings."""
    return derivatives(model, params, cfg.importance, ctx, batches=cfg.calibration_batches,
                       owner=cfg.type_name(), fp16=cfg.fp16, hessian_samples=cfg.hessian_samples)


def _summed(losses: Iterator[torch.Tensor], params: list[nn.Parameter], importance: str,
            samples: int, seed: int) -> list[torch.Tensor]:
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    gen = torch.Generator().manual_seed(seed)
    for loss in losses:
        if importance == "taylor":
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            parts = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        else:
            parts = hutchinson_diagonal(loss, params, samples, gen)
        for a, g in zip(acc, parts):
            a.add_(g.detach().float())
    return acc


def group_scores(model: nn.Module, graph: ChannelGraph, cfg: StructuredPrune,
                 ctx: Context | None) -> list[np.ndarray]:
    """One importance score per unit of each group (group-normalised, see importance).

    Weights count, biases and buffers (BN statistics) do not: a bias's size says little
    about what the channel contributes. A group of biases only scores all ones.
    """
    if cfg.importance == "obs":
        return _obs(model, graph, cfg, ctx)
    biases = {pid for pid, owners in graph.trace.owners.items()
              if all(attr == "bias" for _, attr in owners)}
    keys = {k for g in graph.groups for k in g.slices
            if isinstance(graph.param(k[0]), nn.Parameter) and k[0] not in biases}
    derived: dict[int, torch.Tensor] = {}
    if cfg.importance in DATA_CRITERIA:
        if ctx is None:
            raise DataError(f"importance={cfg.importance!r} needs calibration data")
        pids = sorted({k[0] for k in keys})
        params = [graph.param(pid) for pid in pids]
        derived = dict(zip(pids, _derivatives(model, params, cfg, ctx)))  # type: ignore[arg-type]
    bn_weights = {id(m.weight) for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None}
    out = []
    for g in graph.groups:
        rows, extra, is_bn = [], [], []
        for key, positions in g.slices.items():
            if key not in keys:
                continue
            rows.append(unit_rows(graph.param(key[0]), key[1], positions))
            d = derived.get(key[0])
            extra.append(None if d is None else unit_rows(d, key[1], positions))
            is_bn.append(key[0] in bn_weights)
        if not rows:  # only buffers: nothing to rank by
            out.append(np.ones(len(g)))
            continue
        scores = unit_scores(cfg.importance, rows, extra, is_bn)
        out.append(scores.double().cpu().numpy())
    return out


def _obs(model: nn.Module, graph: ChannelGraph, cfg: StructuredPrune,
         ctx: Context | None) -> list[np.ndarray]:
    """Group-OBS scores (:mod:`netpress.reconstruct.channels`) on the calibration data (else
    ``calibration_batches`` of the training data); L2 where a group has no reader to judge."""
    if ctx is None:
        raise DataError(f"{cfg.type_name()}(importance='obs') needs `calibration=` data; "
                        "pass it to compress()")
    data = ctx.calibration if ctx.calibration is not None \
        else list(_batches(ctx, cfg.calibration_batches, cfg.type_name()))
    fallback = group_scores(model, graph, dataclasses.replace(cfg, importance="l2"), ctx)
    return [f if s is None else s for f, s in zip(fallback, obs_scores(model, graph, data))]
