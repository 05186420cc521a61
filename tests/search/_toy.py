"""A tiny model whose predictions change under compression, and data labelled by it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netpress.testing import TinyCNN, toy_batches


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(classes=4).eval()


def toy_data(n: int = 400, batch: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return toy_batches(n=n, batch=batch, model=toy_model())


def toy_space(model: nn.Module) -> Any:
    from netpress.search import Choice, LayerwiseSpace, Range

    return LayerwiseSpace(model, sparsity=Range(0.0, 0.8, step=0.1), bits=Choice([4, 8]))


def data_factory() -> dict[str, Any]:
    """For the CLI test (``--data module:data_factory``)."""
    return {"evaluate": toy_data()}
