"""Settings and plumbing shared by the layer-wise reconstruction methods."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from netpress._cow import protected, shared_copy
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.errors import ModelError, RecipeError
from netpress.reconstruct.engine import MODES, Solve, run_sequential
from netpress.reconstruct.layers import SUPPORTED_TYPES, LayerView, supported
from netpress.reconstruct.shrinkage import Shrinker, check_setting
from netpress.select import check_patterns, select_names

__all__ = ["LayerwiseSettings", "calibrate", "fitting_reference", "fitted_to",
           "shape_mismatch", "tied_weights", "warn_tied"]


@dataclass(frozen=True, kw_only=True)
class LayerwiseSettings(MethodConfig):
    """Settings every layer-wise method shares (a base class, not a method).

    ``mode`` picks where each layer's calibration inputs come from (``sequential``: the
    model compressed so far, fitted to the original model's outputs; ``sequential-local``;
    ``plain``: the original model); ``damp`` is the Hessian damping as a fraction of its
    mean diagonal; ``shrinkage`` the share ``α`` by which each layer's input correlations
    are shrunk toward zero, ``(1 - α) H + α diag(H)`` (:mod:`~netpress.reconstruct.shrinkage`;
    ``"auto"``: the Ledoit-Wolf intensity from the Hessian and its calibration row count,
    near 0 with plentiful data; 0: the sample Hessian as it is); ``blocksize`` the columns
    per lazy update; ``calibration_batches`` caps the calibration batches used.
    """

    layers: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ()
    mode: str = "sequential"
    damp: float = 0.01
    shrinkage: float | str = "auto"
    blocksize: int = 128
    calibration_batches: int | None = None

    def _check_layerwise(self) -> None:
        name = self.type_name()
        check_patterns(name, layers=self.layers, ignore=self.ignore)
        if self.mode not in MODES:
            raise RecipeError(f"{name}: mode={self.mode!r}; choose one of {MODES}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) \
                or not math.isfinite(self.damp) or not 0 < self.damp <= 1:
            raise RecipeError(f"{name}: damp={self.damp!r} must lie in (0, 1]")
        check_setting(name, self.shrinkage)
        _check_int(name, "blocksize", self.blocksize)
        if self.calibration_batches is not None:
            _check_int(name, "calibration_batches", self.calibration_batches)

    def selected(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected layers the engine supports, in module order."""
        candidates = {n: m for n, m in model.named_modules() if n and supported(m)}
        if not candidates:
            kinds = ", ".join(t.__name__ for t in SUPPORTED_TYPES)
            raise ModelError(f"{self.type_name()}: the model has no {kinds} or transformers "
                             "Conv1D layer to compress")
        names = select_names(list(candidates), self.layers, self.ignore,
                             owner=self.type_name())
        return {n: candidates[n] for n in names}


def _check_int(owner: str, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RecipeError(f"{owner}: {key}={value!r} must be an int >= 1")


def calibrate(model: nn.Module, cfg: LayerwiseSettings, ctx: Context, names: list[str],
              solve: Solve, *, full: bool = True, fit_original: bool = True,
              residual: bool = False) -> dict[str, Any]:
    """Run the sequential engine over ``names`` with the context's calibration data.

    ``fit_original=False`` (a method that makes no weight update) drops the original model's
    inputs from the sequential mode: only the compressed model's inputs matter then.
    ``residual``: the fits get the residual statistic instead of the cross term
    (:attr:`~netpress.reconstruct.engine.LayerStats.residual`)."""
    data = ctx.require("calibration", cfg.type_name())
    mode = "sequential-local" if cfg.mode == "sequential" and not fit_original else cfg.mode
    shrinker = Shrinker(cfg.shrinkage) if full else None
    info = run_sequential(model, ctx.reference, names, data, solve, mode=mode, full=full,
                          max_batches=cfg.calibration_batches, residual=residual,
                          prepare=shrinker)
    if shrinker is not None:
        info.update(shrinker.summary())
        shrinker.warn(cfg.type_name())
    unused = info["not_called"]
    if unused:  # the report lists them too; the total the user asked for is not reached
        more = f" and {len(unused) - 4} more" if len(unused) > 4 else ""
        warnings.warn(f"{cfg.type_name()}: {len(unused)} of the {len(names)} selected layers "
                      f"were never called on the calibration data and are left as they are: "
                      f"{unused[:4]}{more} (branches these inputs do not take, or weights "
                      "the model's code reads directly, e.g. MobileBERT's tied output layer); "
                      "leave them out with ignore= or give inputs that reach them",
                      stacklevel=3)
    return info



def tied_weights(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """The layers of ``names`` whose weight another module holds too (a language model's
    output layer tied to its input embedding table): name -> the other modules."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(f"{name}.{leaf}" if name else leaf)
    out = {}
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        others = [h for h in holders.get(id(weight), []) if h != f"{name}.weight"]
        if isinstance(weight, nn.Parameter) and others:
            out[name] = others
    return out


def warn_tied(model: nn.Module, owner: str, names: Iterable[str]) -> dict[str, list[str]]:
    """Warn about the layers of ``names`` whose pruned weight another module shares (their
    zeros reach it unfitted, e.g. the input embeddings of a tied output layer); returns
    them for the report."""
    tied = tied_weights(model, names)
    for name, others in tied.items():
        warnings.warn(f"{owner}: layer {name!r} shares its weight with {others}: pruning it "
                      "prunes that too, fitted for this layer only (a tied output layer "
                      "zeroes rows of the input embedding table). Leave it out with "
                      f"ignore=({name!r},) to keep them dense", stacklevel=3)
    return tied


def shape_mismatch(model: nn.Module, reference: nn.Module, names: Iterable[str]) -> str | None:
    """Why ``reference``'s layers cannot stand in for ``model``'s (the first layer that is
    missing there or whose matrix view differs in shape), or None when all of them match."""
    for name in names:
        try:
            ref = reference.get_submodule(name)
        except AttributeError:
            return f"layer {name!r} is not in the original model"
        if not supported(ref):
            return f"layer {name!r} is a {type(ref).__name__} in the original model"
        here, there = LayerView(model.get_submodule(name), name).shape, LayerView(ref).shape
        if here != there:
            return (f"layer {name!r} is (groups, rows, inputs) {here} here and {there} in the "
                    "original model")
    return None


@contextmanager
def fitting_reference(model: nn.Module, ctx: Context, names: Iterable[str],
                      ) -> Iterator[str | None]:
    """Within the block, ``ctx.reference`` is the model this step fits its layers to.

    That is the original model, so a layer reproduces the original's outputs, wherever the
    original's layers still have the shapes of ``model``'s. After a step that changed them
    (structured pruning before SparseGPT or GPTQ) the original's outputs are no target for
    the thinner layers, and the step fits to the model *it was given* instead: a copy that
    shares ``model``'s tensors (no weights copied; the step replaces tensors rather than
    writing into them, and they are protected while it runs). Yields the reason for the
    change (None when the original is used), which the step records.
    """
    original = ctx.reference
    why = shape_mismatch(model, original, names) if original is not None else None
    if why is None:
        yield None
        return
    given = shared_copy(model).eval()
    for p in given.parameters():
        p.requires_grad_(False)
    ctx.reference = given
    try:
        with protected(given):
            yield why
    finally:
        ctx.reference = original


def fitted_to(changed: str | None) -> str:
    """What a step's report says it fitted its layers to (see :func:`fitting_reference`)."""
    return "the original model" if changed is None else \
        f"the model this step was given ({changed})"
