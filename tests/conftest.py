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
