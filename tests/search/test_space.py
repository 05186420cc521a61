"""Search spaces: ranges, choices, recipes with ranges, per-layer spaces."""

from __future__ import annotations

import pytest
import torch

import netpress as npr
from netpress.config import Recipe
from netpress.errors import RecipeError, SelectionError
from netpress.search import Choice, LayerwiseSpace, Range, RecipeSpace, Step, load_space
from netpress.search.space import space_fingerprint
from netpress.testing import TinyCNN


def test_range_and_choice_validate_and_grid() -> None:
    assert Range(0.0, 0.9, step=0.3).grid() == [0.0, 0.3, 0.6, 0.9]
    assert Range(4, 8).is_int and not Range(0.1, 0.9).is_int
    assert len(Range(0.01, 1.0, log=True).grid(5)) == 5
    with pytest.raises(RecipeError):
        Range(0.9, 0.1)
    with pytest.raises(RecipeError):
        Range(0.0, 1.0, log=True)
    with pytest.raises(RecipeError):
        Choice([])
    assert Choice([4, 8]).contains(8) and not Choice([4, 8]).contains(6)


def test_recipe_space_builds_valid_recipes() -> None:
    space = RecipeSpace([
        Step(npr.LayerwiseMagnitudePrune, sparsity=Range(0.3, 0.9),
             per_layer={"fc": Range(0.0, 0.5)}),
        Step(npr.WeightOnly, bits=Choice([4, 8])),
    ])
    assert set(space.params) == {"0.sparsity", "0.per_layer[fc]", "1.bits"}
    recipe = space.build({"0.sparsity": 0.5, "0.per_layer[fc]": 0.2, "1.bits": 4})
    prune, quant = recipe.steps
    assert isinstance(prune, npr.LayerwiseMagnitudePrune) and prune.sparsity == 0.5
    assert prune.per_layer == {"fc": 0.2} and isinstance(quant, npr.WeightOnly)
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(RecipeError, match="outside"):
        space.build({"0.sparsity": 0.95, "0.per_layer[fc]": 0.2, "1.bits": 4})
    with pytest.raises(RecipeError, match="unknown field"):
        Step(npr.WeightOnly, bitz=Choice([4]))


def test_load_space_from_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "space.yaml"
    path.write_text("steps:\n"
                    "- type: GlobalMagnitudePrune\n  sparsity: {range: [0.3, 0.9], step: 0.1}\n"
                    "- type: WeightOnly\n  bits: {choice: [4, 8]}\n", encoding="utf-8")
    space = load_space(path)
    assert space.params["0.sparsity"] == Range(0.3, 0.9, 0.1)
    assert space.params["1.bits"] == Choice([4, 8])
    recipe = space.build({"0.sparsity": 0.6, "1.bits": 8})
    assert recipe.steps[0].sparsity == 0.6  # type: ignore[attr-defined]
    assert space_fingerprint(space) == space_fingerprint(load_space(path))


def test_layerwise_space_per_layer_and_grouped() -> None:
    model = TinyCNN()
    space = LayerwiseSpace(model, sparsity=Range(0.0, 0.8, step=0.1), bits=Choice([4, 8]))
    assert len(space.params) == 6  # conv1, conv2, fc: sparsity and bits each
    values = {k: (0.5 if k.startswith("sparsity") else 4) for k in space.params}
    recipe = space.build(values)
    assert recipe.steps[1].per_layer == {"conv1": 4, "conv2": 4, "fc": 4}  # type: ignore[attr-defined]
    prune_only = LayerwiseSpace(model, sparsity=Range(0.0, 0.8, step=0.1))
    result = npr.compress(model, prune_only.build({k: 0.5 for k in prune_only.params}),
                          measure=False, example_inputs=torch.randn(2, 1, 8, 8))
    zeros = float((result.model.conv2.weight == 0).float().mean())
    assert 0.45 <= zeros <= 0.55
    grouped = LayerwiseSpace(model, sparsity=Range(0.0, 0.8), groups={
        "convs": ["re:conv.*"], "head": ["fc"]})
    assert set(grouped.params) == {"sparsity[convs]", "sparsity[head]"}
    prune = grouped.build({"sparsity[convs]": 0.4, "sparsity[head]": 0.1}).steps[0]
    assert prune.per_layer == {"conv1": 0.4, "conv2": 0.4, "fc": 0.1}  # type: ignore[attr-defined]
    with pytest.raises(SelectionError):
        LayerwiseSpace(model, sparsity=Range(0.0, 0.5), groups={"x": ["re:nothing.*"]})
