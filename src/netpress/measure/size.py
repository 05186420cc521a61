"""How big a model is: parameter counts and bytes on disk."""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from netpress.errors import ArtefactError

__all__ = [
    "file_bytes",
    "nonzero_parameter_count",
    "parameter_count",
    "state_dict_bytes",
]


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (a parameter shared by several modules counts once)."""
    return sum(p.numel() for p in model.parameters())


def nonzero_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    with torch.no_grad():
        return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size baseline netpress compares to."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size in bytes of the file at ``path``."""
    if not os.path.isfile(path):
        raise ArtefactError(
            f"cannot measure the size of {os.fspath(path)!r}: no such file; check the path "
            f"the artefact was saved to"
        )
    return os.path.getsize(path)
