"""Data-parallel recovery: ``FineTune``, ``Distill`` and ``LabelPreserve`` under ``torchrun``.

When ``torch.distributed`` is initialised with more than one process, the shared training
loop (:mod:`netpress.recover.loop`) gives each rank every ``world``-th training batch
(:func:`shard`; every rank runs the same number of steps) and trains the model wrapped in
``DistributedDataParallel`` (:func:`data_parallel`), which averages the gradients: a step on
``world`` ranks with batches of ``B`` is a step on one batch of ``world * B``. Every rank
starts from the same weights and applies the same pruning masks (they come from the same
deterministic recipe steps and seed), so the ranks stay identical. Only rank 0 should write
the artefact and the report (:func:`is_main`; ``netpress compress`` does this itself).

``init_from_env`` starts the process group from ``torchrun``'s environment: gloo on CPU,
NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``)::

    torchrun --nproc_per_node=2 -m netpress.cli compress --model ... --recipe r.yaml ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["world", "is_main", "shard", "Shard", "data_parallel", "init_from_env"]


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is rank 0 (always, outside a distributed run)."""
    return world()[0] == 0


class Shard:
    """Every ``size``-th batch of ``data`` from ``rank`` on, the same count on every rank
    (the last incomplete round of batches is dropped). Re-iterable."""

    def __init__(self, data: Any, rank: int, size: int) -> None:
        self.data, self.rank, self.size = data, rank, size

    def __iter__(self) -> Iterator[Any]:
        pending: list[Any] = []
        for batch in self.data:
            pending.append(batch)
            if len(pending) == self.size:
                yield pending[self.rank]
                pending = []

    def __len__(self) -> int:
        return len(self.data) // self.size


def shard(data: Any) -> Any:
    """``data`` itself in a single process, else this rank's :class:`Shard`."""
    rank, size = world()
    return data if size == 1 else Shard(data, rank, size)


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when more than one process runs
    (parameters the loss does not reach are allowed), else ``model`` itself."""
    _, size = world()
    if size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def init_from_env(backend: str | None = None) -> bool:
    """Start the process group from ``torchrun``'s variables (``WORLD_SIZE`` > 1); returns
    whether this is a distributed run. gloo on CPU, NCCL with CUDA."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return True
