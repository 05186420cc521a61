"""Recipes and configs: round trips, type tags, versions, and errors that name the problem."""

import json

import pytest

import netpress as npr
from netpress.config import Recipe


def recipe() -> Recipe:
    return Recipe((
        npr.GlobalMagnitudePrune(sparsity=0.7, floor=0.05, ignore=("re:fc2",)),
        npr.LayerwiseMagnitudePrune(sparsity=0.5, per_layer={"fc1": 0.9, "re:conv.*": 0.3}),
        npr.Distill(epochs=2, temperature=2.0),
        npr.FineTune(max_steps=5, optimizer="sgd"),
    ))


def test_json_and_yaml_round_trip(tmp_path):
    r = recipe()
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_yaml(r.to_yaml()) == r
    for name in ("r.yaml", "r.json"):
        r.save(tmp_path / name)
        assert Recipe.load(tmp_path / name) == r


def test_steps_carry_type_and_version():
    d = recipe().to_dict()
    assert d["netpress_recipe"] == 1
    assert [s["type"] for s in d["steps"]] == ["GlobalMagnitudePrune", "LayerwiseMagnitudePrune",
                                               "Distill", "FineTune"]
    assert all(s["version"] == 1 for s in d["steps"])
    json.dumps(d)


def test_tuples_come_back_as_tuples():
    r = Recipe.from_json(recipe().to_json())
    assert r.steps[0].ignore == ("re:fc2",)


def test_unknown_method_is_named():
    with pytest.raises(npr.RecipeError, match="unknown method 'Prunify'.*GlobalMagnitudePrune"):
        Recipe.from_dict([{"type": "Prunify"}])


def test_unknown_key_is_named():
    with pytest.raises(npr.RecipeError, match="step 1: .*unknown key.*'sparsty'"):
        Recipe.from_dict([{"type": "Distill"}, {"type": "GlobalMagnitudePrune", "sparsty": 0.5}])


def test_unknown_top_level_key_and_future_versions():
    with pytest.raises(npr.RecipeError, match="unknown top-level"):
        Recipe.from_dict({"netpress_recipe": 1, "steps": [], "extra": 1})
    with pytest.raises(npr.RecipeError, match="format version 9"):
        Recipe.from_dict({"netpress_recipe": 9, "steps": []})
    with pytest.raises(npr.RecipeError, match="version 3 is not supported"):
        Recipe.from_dict([{"type": "Distill", "version": 3}])


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_sparsity_outside_unit_interval(value):
    with pytest.raises(npr.RecipeError, match="sparsity"):
        npr.GlobalMagnitudePrune(sparsity=value)
    with pytest.raises(npr.RecipeError, match="sparsity"):
        Recipe.from_dict([{"type": "LayerwiseMagnitudePrune", "sparsity": value}])


def test_bad_values_are_named():
    with pytest.raises(npr.RecipeError, match="per_layer\\['fc1'\\]"):
        npr.LayerwiseMagnitudePrune(per_layer={"fc1": 2.0})
    with pytest.raises(npr.RecipeError, match="schedule='linear'"):
        npr.GlobalMagnitudePrune(schedule="linear")
    with pytest.raises(npr.RecipeError, match="optimizer='rmsprop'"):
        npr.FineTune(optimizer="rmsprop")
    with pytest.raises(npr.RecipeError, match="temperature"):
        npr.Distill(temperature=0)


def test_configs_are_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        npr.GlobalMagnitudePrune(0.5)  # type: ignore[misc]
    cfg = npr.GlobalMagnitudePrune(sparsity=0.5)
    with pytest.raises(AttributeError):
        cfg.sparsity = 0.6  # type: ignore[misc]


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(npr.RecipeError, match="YAML"):
        Recipe.from_yaml("steps: [\n")
    with pytest.raises(npr.RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")


def test_yaml_cannot_build_python_objects():
    evil = "!!python/object/apply:os.system ['echo hi']"
    with pytest.raises(npr.RecipeError):
        Recipe.from_yaml(evil)


def test_registry_lists_builtin_methods():
    names = {m.name: m for m in npr.list_methods()}
    assert {"GlobalMagnitudePrune", "LayerwiseMagnitudePrune", "FineTune", "Distill"} <= set(names)
    assert names["Distill"].kind == "recover" and names["Distill"].needs == ("train",)
    assert names["GlobalMagnitudePrune"].summary
