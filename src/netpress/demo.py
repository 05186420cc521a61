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


def _cache_file(out: Path | None, seed: int, epochs: int) -> Path | None:
    """Where the trained reference is cached: keyed by seed, training length and the
    netpress and torch versions, so that any change retrains."""
    if out is None:
        return None
    from netpress.report.report import netpress_version

    key = f"seed{seed}-epochs{epochs}-netpress{netpress_version()}-torch{torch.__version__}"
    return out / ".cache" / f"reference-digits_cnn-{key.replace('+', '_')}.safetensors"


def _reference(train_loader: Any, *, seed: int, epochs: int, cache: Path | None,
               progress: bool, console: Any) -> nn.Module:
    """The demo's trained reference: loaded from ``cache`` when there, else trained (and
    saved to ``cache``)."""
    from safetensors.torch import load_file, save_file

    from netpress._atomic import atomic_path
    from netpress.models import DigitsCNN

    if cache is not None and cache.is_file():
        try:
            cached = DigitsCNN()
            cached.load_state_dict(load_file(str(cache)))
            console.print(f"netpress demo: reusing the trained reference from {cache} "
                          f"(delete it to train again)")
            return cached.eval()
        except Exception as exc:  # corrupt or stale (any reader error): train again
            console.print(f"netpress demo: cannot reuse {cache} ({exc}); training again")
    torch.manual_seed(seed)
    model: nn.Module = DigitsCNN()
    console.print(f"netpress demo: training the reference DigitsCNN on scikit-learn digits "
                  f"({epochs} epochs) …")
    model = train_classifier(model, train_loader, epochs=epochs, seed=seed, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model


def run_demo(out: str | Path | None = None, *, sparsity: float = 0.85, seed: int = 0,
             progress: bool | None = None, console: Any = None,
             epochs: int = 30) -> CompressionResult:
    """Train the digits CNN, compress it with :func:`default_recipe`, print and save the report.

    With ``out``, writes ``report.json``, ``report.md``, ``report.html``, ``recipe.yaml`` and
    ``model.npress`` there, and checks that the saved artefact loads back to the same outputs;
    the trained reference is cached in ``out/.cache`` (keyed by seed, ``epochs`` and the
    netpress and torch versions), so a second run skips the training. Each step prints a
    status line; on a terminal (or with ``progress=True``) the long ones show a bar too.
    """
    from rich.console import Console

    from netpress.datasets import digits, loader

    console = console or Console()
    t0 = time.perf_counter()
    train_set, test_set = digits(seed=seed)
    train_loader = loader(train_set, batch_size=64, shuffle=True, seed=seed)
    test_loader = loader(test_set, batch_size=256)
    cache = _cache_file(None if out is None else Path(out), seed, epochs)
    model = _reference(train_loader, seed=seed, epochs=epochs, cache=cache,
                       progress=progress_enabled(progress), console=console)
    console.print(f"netpress demo: reference ready ({len(train_set)} train / {len(test_set)} "
                  f"test digits) after {time.perf_counter() - t0:.1f}s")
    recipe = default_recipe(sparsity)
    console.print("netpress demo: pruning to "
                  f"{sparsity:.0%} sparsity while distilling from the reference "
                  f"({getattr(recipe.steps[1], 'epochs', '?')} epochs), then measuring the "
                  f"report …")
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
