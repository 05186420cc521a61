"""The few entry points: :func:`compress` and :func:`load`.

``compress`` works on a copy of the model by default: the input model is never modified.
Everything the recipe needs is checked before the first method runs, so a bad recipe or bad
data fails fast and leaves nothing half-done.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress._cow import materialize, protected, shared_copy
from netpress._inputs import Inputs, take_batch
from netpress._progress import progress_enabled
from netpress.config import MethodConfig, Recipe
from netpress.context import Context
from netpress.data import Data, check_data, first_batch
from netpress.errors import DataError, ModelError, RecipeError
from netpress.measure.sections import wanted_sections
from netpress.reconstruct._measure import trim_heap
from netpress.registry import get_method
from netpress.report import Report

__all__ = ["compress", "load", "CompressionResult", "check_finite", "artefact_summary"]

DATA_ARGS = ("calibration", "train", "evaluate")


@dataclass
class CompressionResult:
    """What :func:`compress` returns: the compressed model, its report and its recipe."""

    model: nn.Module
    report: Report
    recipe: Recipe
    reference: nn.Module
    example_inputs: Any = None

    def save(self, path: str | Path) -> int:
        """Write the compressed artefact (``.npress``); returns the bytes written.

        With example inputs known, the stored graph is verified to reproduce the model's
        outputs before anything is written, and their shapes are stored in the metadata
        (``inputs``: see :func:`netpress._inputs.input_spec`; ``netpress export`` reads them).
        """
        from netpress._inputs import input_spec
        from netpress.export import save_artefact

        return save_artefact(path, self.model, recipe=self.recipe.to_dict(),
                             metadata={"report": artefact_summary(self.report.summary()),
                                       "inputs": input_spec(self.example_inputs)},
                             example_inputs=self.example_inputs)

    def save_report(self, directory: str | Path, *, html: bool = True) -> Path:
        """Write ``report.json``, ``report.md`` and (``html=True``) the self-contained
        ``report.html`` with plots into ``directory``; returns the JSON path."""
        return self.report.write(directory, html=html)


TIMING_PREFIXES = ("latency.",)
"""Report summary keys that are timings: machine- and moment-dependent, kept out of artefacts."""


def artefact_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The report summary an artefact stores: everything but timings, so that two runs with
    the same seed write byte-identical artefacts (timings stay in ``report.json``)."""
    return {k: v for k, v in summary.items() if not k.startswith(TIMING_PREFIXES)}


def check_finite(model: nn.Module, *, what: str = "model") -> None:
    """Raise ModelError naming the first parameter or buffer that holds NaN or Inf, or that is
    on the meta device (no values at all)."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ModelError(f"{what}: {kind} {name!r} is on the meta device, so it has no "
                                 "values; materialise the model first (e.g. "
                                 "model.to_empty(device='cpu'), then load its weights)")
            if t.is_floating_point() and not _finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelError(f"{what}: {kind} {name!r} holds {bad} NaN/Inf value(s); fix or "
                                 f"retrain the model before compressing it")


def _finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """``isfinite(t).all()`` a million values at a time: no bool copy of a large tensor (an
    embedding table's is 23 MB on BERT-base) on top of the two models at the end of
    ``compress()``."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def _validate_recipe(recipe: Recipe, given: dict[str, Any]) -> None:
    infos = [get_method(step) for step in recipe]
    for i, (step, info) in enumerate(zip(recipe, infos)):
        for need in info.needs_of(step):
            if given.get(need) is None:
                raise DataError(f"recipe step {i} ({info.name}) needs `{need}=` data; pass it "
                                f"to compress()")
        schedule = getattr(step, "schedule", "oneshot")
        if schedule != "oneshot" and not any(later.is_recovery for later in infos[i + 1:]):
            raise RecipeError(f"recipe step {i} ({info.name}) uses schedule={schedule!r}, "
                              f"which ramps over the recovery steps after it; add FineTune "
                              f"or Distill after it")


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        if "deepcopy" not in str(exc):
            raise
        raise ModelError(
            "the model cannot be copied: it holds computed weights (torch.nn.utils.prune or "
            "weight_norm reparametrisation). Make them permanent first (prune.remove / "
            "remove_weight_norm), or pass inplace=True") from exc


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers share ``model``'s storage
    (new Parameter objects, no weights copied): the reference netpress only ever reads. It
    saves one full model copy of memory in every compress() (418 MB on BERT-base)."""
    try:
        return shared_copy(model)
    except RuntimeError:
        return _copy(model)  # the same errors as a full copy, named by _copy


def _frozen_reference(base: nn.Module, dev: torch.device, *, copy_data: bool) -> nn.Module:
    """The reference in eval mode without gradients. It shares its tensors with ``base``,
    which netpress never writes to, unless ``copy_data`` (with ``inplace=True`` the caller's
    model becomes the working copy and changes)."""
    reference = (_copy(base) if copy_data else _shared_copy(base)).to(dev).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def compress(
    model: nn.Module,
    recipe: Recipe | MethodConfig | Iterable[MethodConfig] | str | Path,
    *,
    example_inputs: Inputs | None = None,
    calibration: Data | None = None,
    train: Data | None = None,
    evaluate: Data | None = None,
    reference: nn.Module | None = None,
    task: Any = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    inplace: bool = False,
    measure: bool = True,
    latency_batch_size: int = 32,
    threads: int = 1,
    progress: bool | None = None,
    sections: tuple[str, ...] = (),
) -> CompressionResult:
    """Apply ``recipe`` to (a copy of) ``model`` and measure the result against the original.

    Data arguments are re-iterables of ``(inputs, labels)`` batches and are needed only when a
    method needs them: ``calibration`` for quantization, ``train`` for recovery, ``evaluate``
    for the report's accuracy and agreement. ``example_inputs`` (a tensor, tuple, or dict of
    keyword inputs) is used for MACs, latency and graph capture; it defaults to one row of the
    first available batch. ``task`` replaces the default classification metrics (a
    :class:`netpress.measure.Task` or a callable ``(ref_out, cmp_out, labels) -> dict``).
    ``reference`` is the model to stay faithful to (the distillation teacher and the
    report's baseline); it defaults to ``model`` itself, and differs when ``model`` was
    already compressed elsewhere. ``result.reference`` shares its weights with the model it
    was made from (netpress only reads it: no second copy of the weights in memory); the
    compressed model is a copy. While the steps run it shares the tensors of ``model`` that
    the methods have not replaced (copy-on-write, :mod:`netpress._cow`); the result owns all
    of its tensors. Runs are deterministic for a given ``seed``.
    ``sections`` asks for optional report sections (``"activations"``, ``"robustness"``;
    :mod:`netpress.measure.sections`), which a recipe's ``act_sparsity``/``cond_reg`` and a
    ``Split`` step also switch on.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"compress() takes an nn.Module, got {type(model).__name__}")
    recipe = Recipe.of(recipe)
    wanted_sections((), sections)  # unknown names fail before any work
    data = {"calibration": calibration, "train": train, "evaluate": evaluate}
    for name in ("evaluate", "calibration", "train") if example_inputs is None else ():
        source = data[name]  # one input of the data: what shape-tracing steps need
        if source is not None:
            example_inputs = take_batch(first_batch(source, name=name)[0], 1)
            break
    given: dict[str, Any] = {**data, "example_inputs": example_inputs}
    _validate_recipe(recipe, given)
    check_finite(model)
    dev = _device_of(model, device)
    reference = _frozen_reference(model if reference is None else reference, dev,
                                  copy_data=inplace and reference in (None, model))
    for name, value in data.items():
        if value is not None:
            check_data(name, value, reference, dev)
    # copy-on-write: the working copy shares the caller's tensors, which stay protected while
    # the steps run (netpress._cow); what a step may not replace is copied before it runs
    work = model if inplace else _shared_copy(model)
    work.to(dev)
    ctx = Context(reference=reference, device=dev, example_inputs=example_inputs,
                  calibration=calibration, train=train, evaluate=evaluate, seed=seed,
                  progress=progress_enabled(progress))
    started = time.perf_counter()
    with protected(None if inplace else model):
        work = _run_steps(work, recipe, ctx)
    elapsed = time.perf_counter() - started
    report = Report.build(reference, work, recipe=recipe, ctx=ctx, task=task, measure=measure,
                          latency_batch_size=latency_batch_size, threads=threads,
                          compress_seconds=elapsed, sections=tuple(sections))
    return CompressionResult(model=work, report=report, recipe=recipe, reference=reference,
                             example_inputs=example_inputs)


def _run_steps(model: nn.Module, recipe: Recipe, ctx: Context) -> nn.Module:
    devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(ctx.seed)
        for step in recipe:
            info = get_method(step)
            if not info.copy_on_write:
                trim_heap()  # the copy below lands in memory the finished steps freed
                materialize(model)  # a real copy of whatever the model still shares
            model = info.apply(model, step, ctx)
        trim_heap()
        materialize(model)  # the result never aliases the caller's model
        ctx.finish_schedules(model)
        ctx.apply_masks(model)
    model.eval()
    check_finite(model, what="compressed model")
    return model


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Load a compressed model saved by :meth:`CompressionResult.save`.

    No code from the file is executed. Without ``model`` the architecture is rebuilt from the
    graph stored in the file; pass ``model=`` (an instance of the original architecture) for
    models whose graph could not be captured, or to get your own module classes back.
    """
    from netpress.export import load_artefact

    return load_artefact(path, model=model).model
