"""Shared helpers for the benchmarks: data location, evaluation, and table output."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from netpress.measure import collect_outputs


def data_dir(arg: str | None) -> Path:
    """The shared data folder from ``--data`` or NETPRESS_DATA; exits loudly if missing."""
    path = arg or os.environ.get("NETPRESS_DATA")
    if not path or not Path(path).is_dir():
        sys.exit("!!! benchmark needs the shared data: pass --data ../shared/data or set "
                 "NETPRESS_DATA !!!")
    return Path(path)


def logits(model: torch.nn.Module, dataset: Any, batch_size: int = 500) -> torch.Tensor:
    """Logits of ``model`` over a TensorDataset, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return collect_outputs(model, loader)[0]


def accuracy(out: torch.Tensor, labels: torch.Tensor) -> float:
    return float((out.argmax(1) == labels).float().mean())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


class Timer:
    def __enter__(self) -> Timer:
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t


def cpu_flags() -> str:
    """The vector-instruction flags the CPU reports (what BENCHMARKS.md tables name)."""
    import re

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " ".join(sorted(set(re.findall(r"\b(avx512_vnni|avx_vnni|avx2)\b", text))))


def parse_value(text: str) -> Any:
    """A command-line ``key=value`` value: an int, a float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)
