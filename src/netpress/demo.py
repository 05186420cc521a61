"""The embedded demo: train a small CNN on scikit-learn's digits, compress it, report.

No download: the digits data set ships inside scikit-learn. ``netpress demo`` and
``make demo`` run :func:`run_demo`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netpress._progress import progress_bar, progress_enabled
from netpress.api import CompressionResult, compress, load
from netpress.config import Recipe
from netpress.prune.unstructured import GlobalMagnitudePrune
from netpress.recover.methods import Distill

__all__ = ["default_recipe", "train_classifier", "run_demo"]


def default_recipe(sparsity: float = 0.85) -> Recipe:
    """Gradual global magnitude pruning (cubic ramp) during distillation from the reference."""
    return Recipe((
        GlobalMagnitudePrune(sparsity=sparsity, floor=0.05, schedule="cubic", ramp_end=0.6),
        Distill(epochs=12, lr=1e-3, temperature=4.0, alpha=0.9),
    ))


def train_classifier(model: nn.Module, loader: Any, *, epochs: int, lr: float = 2e-3,
                     seed: int = 0, progress: bool = False) -> nn.Module:
    """Plain cross-entropy training (Adam, cosine schedule): the demo's reference model."""
    with torch.random.fork_rng(devices=[]), \
            progress_bar(epochs * len(loader), "training the reference", progress) as advance:
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                sched.step()
                advance(loss=loss.item())
    return model.eval()


def run_demo(out: str | Path | None = None, *, sparsity: float = 0.85, seed: int = 0,
             progress: bool | None = None, console: Any = None) -> CompressionResult:
    """Train the digits CNN, compress it with :func:`default_recipe`, print and save the report.

    With ``out``, writes ``report.json``, ``report.md``, ``report.html``, ``recipe.yaml`` and
    ``model.npress`` there, and checks that the saved artefact loads back to the same outputs.
    """
    from rich.console import Console

    from netpress.datasets import digits, loader
    from netpress.models import DigitsCNN

    console = console or Console()
    t0 = time.perf_counter()
    train_set, test_set = digits(seed=seed)
    train_loader = loader(train_set, batch_size=64, shuffle=True, seed=seed)
    test_loader = loader(test_set, batch_size=256)
    torch.manual_seed(seed)
    model = train_classifier(DigitsCNN(), train_loader, epochs=30, seed=seed,
                             progress=progress_enabled(progress))
    console.print(f"[bold]netpress demo[/]: trained the reference DigitsCNN on scikit-learn "
                  f"digits ({len(train_set)} train / {len(test_set)} test) in "
                  f"{time.perf_counter() - t0:.1f}s")
    recipe = default_recipe(sparsity)
    result = compress(model, recipe, train=train_loader, evaluate=test_loader, seed=seed,
                      progress=progress, latency_batch_size=64)
    result.report.print(console)
    if out is not None:
        _write_outputs(result, Path(out), test_set.tensors[0][:64], console)
    console.print(f"done in {time.perf_counter() - t0:.1f}s")
    return result


def _write_outputs(result: CompressionResult, out: Path, probe: torch.Tensor,
                   console: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    artefact = out / "model.npress"
    result.save(artefact)
    result.recipe.save(out / "recipe.yaml")
    result.save_report(out)
    reloaded = load(artefact)
    with torch.inference_mode():
        same = torch.equal(reloaded(probe), result.model(probe))
    console.print(f"wrote {out}/report.json, report.md, report.html, recipe.yaml and "
                  f"model.npress "
                  f"({artefact.stat().st_size:,} bytes); reloaded outputs identical: {same}")
