"""The Fisher pass of :class:`~netpress.prune.posttraining.FisherPrune` (Kwon et al. 2022):
per-unit Fisher scores of the groups read by one Linear each, from the gradients at the
readers' inputs of a sum of per-sample losses (next token, sampled labels, or a Gaussian
projection of the output), one sample per forward and backward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from netpress._inputs import _map_tensors, batch_size_of, call_model, primary_output
from netpress.errors import ModelError
from netpress.graph import ChannelGraph
from netpress.measure.collect import evaluating
from netpress.prune.fisher import column_mask_grads, unit_fisher
from netpress.reconstruct._measure import trim_heap
from netpress.reconstruct.layers import is_hf_conv1d


@dataclass
class _Group:
    """A graph group whose units are read by exactly one Linear (its ``reader``)."""

    index: int
    reader: str
    columns: list[np.ndarray]


def _input_dim(module: nn.Module) -> int | None:
    """The dimension of ``module.weight`` that indexes the layer's input channels: 1 for
    ``nn.Linear`` and convolutions, 0 for ``transformers``' ``Conv1D`` (weight stored
    in × out); None for a module that does not read channels through its weight."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1
    if is_hf_conv1d(module):
        return 0
    return None


def _readers(model: nn.Module, graph: ChannelGraph) -> list[_Group]:
    """The groups whose units are read by exactly one layer, an ``nn.Linear`` or a
    ``transformers`` ``Conv1D``. A group that other layers (convolutions, further Linear or
    Conv1D layers) read too is not a set of heads or FFN neurons: GPT-2's residual stream,
    read by its ``Conv1D`` layers and by ``lm_head`` alone among the ``nn.Linear`` layers,
    must stay whole."""
    reading = {id(m.weight): (name, m) for name, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), nn.Parameter)
               and _input_dim(m) is not None}
    out = []
    for i, g in enumerate(graph.groups):
        reads = [(reading[pid][0], reading[pid][1], cols) for (pid, dim), cols in g.slices.items()
                 if pid in reading and id(graph.param(pid)) == pid
                 and dim == _input_dim(reading[pid][1])]
        if len(reads) == 1 and (isinstance(reads[0][1], nn.Linear)
                                or is_hf_conv1d(reads[0][1])):
            out.append(_Group(i, reads[0][0], reads[0][2]))
    return out


def _real(inputs: Any, like: torch.Tensor) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and like.dim() == 3 and mask.shape == like.shape[:2]:
        return mask.bool()
    return None


def _sample_loss(model: nn.Module, output: Any, inputs: Any, gen: torch.Generator,
                 noise: _Noise | None = None) -> torch.Tensor:
    """A sum of per-sample losses whose gradients give the (empirical) Fisher. With
    ``noise``, ``output`` is a slice of a batch and the Gaussian case's projection is that
    slice of one drawn for the whole batch (the draws of the unsliced batch)."""
    y = primary_output(output).float()
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if _is_lm(model, y, inputs):
        assert isinstance(ids, torch.Tensor)
        real = _real(inputs, y)
        keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if real is None else \
            real[:, :-1] & real[:, 1:]
        nll = F.cross_entropy(y[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return (nll * keep.flatten().float()).sum()
    if y.dim() == 2 and y.shape[-1] > 1:
        with torch.no_grad():
            labels = torch.multinomial(y.softmax(-1).cpu(), 1, generator=gen).squeeze(1)
        return F.cross_entropy(y, labels.to(y.device), reduction="sum")
    pooled = y
    real = _real(inputs, y)
    if y.dim() == 3:
        m = torch.ones(y.shape[:2], device=y.device) if real is None else real.float()
        pooled = (y * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
    if noise is None:
        u = torch.randn(pooled.shape, generator=gen)
    else:
        if noise.u is None:
            noise.u = torch.randn((noise.batch, *pooled.shape[1:]), generator=gen)
        u = noise.u[noise.start:noise.start + pooled.shape[0]]
    u = u.to(pooled.device)
    return (pooled.reshape(pooled.shape[0], -1) * u.reshape(u.shape[0], -1)).sum()


@dataclass
class _Noise:
    """The slice ``start:`` of a batch of ``batch`` samples, and its Gaussian projection."""

    batch: int
    start: int = 0
    u: torch.Tensor | None = None


#: samples per forward + backward in the Fisher pass: the activations kept for the gradients
#: of BERT-base at 8 x 128 tokens were ~90 MB per block (1.1 GB in all); sample losses are
#: independent, so slices give the same per-sample gradients
_FISHER_SLICE = 1


def _is_lm(model: nn.Module, y: torch.Tensor, inputs: Any) -> bool:
    """The next-token case of :func:`_sample_loss`: logits over the vocabulary per token."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return y.dim() == 3 and isinstance(ids, torch.Tensor) and ids.shape == y.shape[:2] \
        and y.shape[-1] == vocab


def _is_sampled(model: nn.Module, y: torch.Tensor, inputs: Any) -> bool:
    """The classifier case of :func:`_sample_loss` (labels drawn from the whole batch)."""
    return not _is_lm(model, y, inputs) and y.dim() == 2 and y.shape[-1] > 1


def _fisher(model: nn.Module, groups: list[_Group], data: list[Any], seed: int,
            unscored: dict[str, str] | None = None) -> dict[int, torch.Tensor]:
    """Unit Fisher scores per group index. The readers no score could be had for are put
    in ``unscored`` with why (see :func:`_unscored`; their groups have no score); without
    it, such a reader is an error."""
    readers = {g.reader for g in groups}
    grads: dict[str, list[torch.Tensor]] = {r: [] for r in readers}
    current: dict[str, Any] = {}
    called: set[str] = set()

    def pre_hook(name: str) -> Callable[..., Any]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> Any:
            called.add(name)
            x, out = args[0], None
            if isinstance(x, torch.Tensor) and not x.requires_grad and x.is_floating_point():
                # no reader before this one: the gradient starts here (the parameters take
                # none, see below); the same values as from a graph through the weights
                x = x.detach().requires_grad_()
                out = (x, *args[1:])

            # the hook holds a detached view: holding x itself made a cycle through x's
            # autograd node that the garbage collector cannot see, and every reader input of
            # every batch stayed alive (0.7 GB after BERT-base's Fisher pass)
            seen = x.detach()

            def on_grad(g: torch.Tensor) -> None:
                grads[name].append(column_mask_grads(seen, g, current.get("real")))
            if x.requires_grad:
                x.register_hook(on_grad)
            return out
        return fn

    modules = dict(model.named_modules())
    handles = [modules[r].register_forward_pre_hook(pre_hook(r)) for r in readers]
    gen = torch.Generator().manual_seed(seed)
    # only the readers' inputs need gradients: no weight gradients (one model size) and no
    # activations kept for them
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with evaluating(model), torch.enable_grad():
            for x in data:
                _fisher_batch(model, x, gen, current)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    scores = {}
    for g in groups:
        if not grads[g.reader]:
            why = _unscored(g.reader in called)
            if unscored is None:
                raise ModelError(f"FisherPrune: no score for {g.reader!r}: {why}")
            unscored[g.reader] = why
            continue
        scores[g.index] = unit_fisher(torch.cat(grads[g.reader]), g.columns)
    return scores


def _unscored(called: bool) -> str:
    """Why a reader got no gradient at its input: it was called but the loss does not
    depend on its output (a pooling head a classifier does not use, a layer run under
    no_grad inside a custom autograd function), or it was never called as a module (the
    model reads its weight directly, as Mamba's ``dt_proj.weight @ x``)."""
    if called:
        return ("called, but no gradient reached its input: the model's output does not "
                "depend on it, or it runs where autograd cannot follow")
    return ("never called as a module on the calibration data (the model may read its "
            "weight directly)")


def _fisher_batch(model: nn.Module, x: Any, gen: torch.Generator,
                  current: dict[str, Any]) -> None:
    """Forward and backward of one batch, in slices of :data:`_FISHER_SLICE` samples (the
    whole batch where labels are sampled from it)."""
    size = batch_size_of(x)
    noise = _Noise(size)
    for start in range(0, size, _FISHER_SLICE):
        part = _slice(x, start, start + _FISHER_SLICE) if size > _FISHER_SLICE else x
        noise.start = start
        out = call_model(model, part)
        y = primary_output(out)
        if part is not x and _is_sampled(model, y, part):
            del out, y  # nothing was recorded yet: no backward ran
            part, noise, out = x, None, call_model(model, x)  # type: ignore[assignment]
            y = primary_output(out)
        current["real"] = _real(part, y)
        loss = _sample_loss(model, out, part, gen, noise)
        if loss.requires_grad:  # else no reader is on the path: reported by the caller
            loss.backward()
        del out, y, loss
        trim_heap()  # the backward's freed activations, held by glibc otherwise
        if part is x:
            return


def _slice(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every batched tensor in ``inputs``."""
    size = batch_size_of(inputs)
    return _map_tensors(inputs, lambda t: t[start:stop]
                        if t.dim() > 0 and t.shape[0] == size else t)
