"""Optional report sections: ``split``, ``activations`` and ``robustness``.

They cost extra passes over the evaluation data, so each appears when the recipe calls for
it or when asked (``compress(..., sections=[...])``):

* ``split``: whenever the compressed model holds a :class:`~netpress.split.SplitModel`
  (:func:`netpress.split.split_section`);
* ``activations``: when a recovery step sets ``act_sparsity`` (its ``act_layers`` are the
  layers measured), or on request; reference and compressed side by side
  (:func:`netpress.measure.activations.activation_section`);
* ``robustness``: when a recovery step sets ``cond_reg``, or on request
  (:func:`netpress.measure.robustness.robustness_section`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from netpress.errors import RecipeError, SelectionError

__all__ = ["SECTIONS", "wanted_sections", "extra_sections"]

SECTIONS = ("split", "activations", "robustness")


def wanted_sections(recipe: Iterable[Any], requested: Iterable[str] = ()) -> set[str]:
    """The optional sections a recipe calls for, plus the ``requested`` ones."""
    asked = set(requested)
    unknown = sorted(asked - set(SECTIONS))
    if unknown:
        raise RecipeError(f"unknown report section(s) {unknown}; choose from {SECTIONS}")
    for step in recipe:
        if getattr(step, "act_sparsity", None):
            asked.add("activations")
        if getattr(step, "cond_reg", None):
            asked.add("robustness")
    return asked


def _act_layers(recipe: Iterable[Any]) -> tuple[str, ...]:
    for step in recipe:
        if getattr(step, "act_sparsity", None):
            return tuple(getattr(step, "act_layers", ()))
    return ()


def extra_sections(reference: nn.Module, compressed: nn.Module, *, recipe: Iterable[Any],
                   evaluate: Any, train: Any = None, example_inputs: Any = None,
                   requested: Iterable[str] = (), threads: int = 1) -> dict[str, Any]:
    """The optional sections for this compression (empty without ``evaluate`` data)."""
    from netpress.measure.compare import to_jsonable
    from netpress.split.model import find_split

    steps = list(recipe)
    wanted = wanted_sections(steps, requested)
    out: dict[str, Any] = {}
    if evaluate is None:
        return out
    split = find_split(compressed)
    if split is not None:
        from netpress.split.measure import split_section

        out["split"] = split_section(reference, split, evaluate, train=train,
                                     example_inputs=example_inputs, threads=threads)
    if "activations" in wanted:
        from netpress.measure.activations import activation_section

        layers = _act_layers(steps)
        try:
            out["activations"] = {
                "reference": activation_section(reference, evaluate, layers=layers),
                "compressed": activation_section(compressed, evaluate, layers=layers,
                                                 reference=reference)}
        except SelectionError as exc:  # the compression is done: report why, do not fail
            out["activations"] = {"skipped": str(exc)}
    if "robustness" in wanted:
        from netpress.measure.robustness import robustness_section

        out["robustness"] = robustness_section(reference, compressed, evaluate, max_batches=8)
    return to_jsonable(out)
