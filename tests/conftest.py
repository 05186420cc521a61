"""Shared pytest fixtures for netpress's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
