"""Shared pieces of the refit tests: the toy transformer cut by FisherPrune (no refit yet)
from a few images, and its held-out relative output error."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from netpress.prune.posttraining import FisherPrune, fisher_cut
from netpress.testing import toy_batches, toy_transformer


def _cut(images: int) -> tuple[torch.nn.Module, Any, list[torch.Tensor]]:
    """The toy transformer, its 60%-MACs FisherPrune cut from ``images`` 8x8 images (8
    tokens each, one batch) and that batch."""
    model = toy_transformer()
    data = [b for b, _ in toy_batches(n=images, batch=images)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Fisher-ranked units: the refit tests' figures were measured on that cut
        cut = fisher_cut(model, FisherPrune(macs=0.6, calibration_batches=1, rank="fisher"),
                         data[0], data)
    return model, cut, data


def _held_out_error(model: torch.nn.Module, ref: torch.nn.Module) -> float:
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((model(x) - ref(x)).norm() / ref(x).norm())


@pytest.fixture
def toy_cut() -> Callable[[int], tuple[torch.nn.Module, Any, list[torch.Tensor]]]:
    return _cut


@pytest.fixture
def held_out_error() -> Callable[[torch.nn.Module, torch.nn.Module], float]:
    return _held_out_error
