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


# -- strict loading: hostile and unlucky recipe files -------------------------------------------
def _laughs(levels: int = 9) -> str:
    lines = ["steps:", '- a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"  a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_at_load_quickly(tmp_path):
    import time

    path = tmp_path / "laughs.yaml"
    path.write_text(_laughs())  # 9**9 = 387 million strings once expanded; the step has no type
    assert path.stat().st_size < 600
    started = time.perf_counter()
    with pytest.raises(npr.RecipeError, match="expands to more than 100000 values"):
        Recipe.load(path)
    assert time.perf_counter() - started < 5


def test_error_messages_print_a_bounded_repr():
    from netpress.registry import config_from_dict

    big = {f"k{i}": "v" * 10_000 for i in range(1000)}
    with pytest.raises(npr.RecipeError, match="needs a 'type'") as err:
        config_from_dict(big)
    assert len(str(err.value)) < 300


def test_recursive_alias_is_refused():
    with pytest.raises(npr.RecipeError, match="contains itself"):
        Recipe.from_yaml("steps: &s [*s]")


def test_mixed_type_keys_are_named():
    with pytest.raises(npr.RecipeError, match="key 1 .* recipe keys are strings"):
        Recipe.from_yaml("steps:\n- type: Distill\n  1: x\n  temperature: 2.0\n")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"steps:\n- type: Distill # \xff\xfe\n")
    with pytest.raises(npr.RecipeError, match="not UTF-8"):
        Recipe.load(path)


def test_deep_nesting_yaml_and_json():
    with pytest.raises(npr.RecipeError, match="nests"):
        Recipe.from_yaml("steps: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(npr.RecipeError, match="nests"):
        Recipe.from_json('{"steps": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(npr.RecipeError, match="nests deeper than 32"):
        Recipe.from_json('{"steps": ' + "[" * 40 + "]" * 40 + "}")


def test_huge_integers():
    digits = "9" * 5000
    with pytest.raises(npr.RecipeError, match="not valid YAML"):
        Recipe.from_yaml(f"steps:\n- type: FineTune\n  max_steps: {digits}\n")
    with pytest.raises(npr.RecipeError, match="not valid JSON"):
        Recipe.from_json(f'{{"steps": [{{"type": "FineTune", "max_steps": {digits}}}]}}')
    with pytest.raises(npr.RecipeError, match="max_steps = 9999.* does not fit in 64 bits"):
        Recipe.from_yaml(f"steps:\n- type: FineTune\n  max_steps: {'9' * 30}\n")


def test_an_empty_recipe_file_is_refused_but_an_empty_recipe_value_is_fine(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("netpress_recipe: 1\nsteps: []\n")
    with pytest.raises(npr.RecipeError, match="has no steps.*indentation"):
        Recipe.load(path)
    assert len(Recipe.from_yaml(path.read_text())) == 0  # the identity, as a value
    assert len(Recipe(())) == 0


def test_bad_layer_pattern_fails_at_load_naming_the_step_and_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n- type: GlobalMagnitudePrune\n  sparsity: 0.5\n  ignore: ['re:(']\n")
    with pytest.raises(npr.RecipeError, match=r"step 0 \(GlobalMagnitudePrune\): ignore: layer "
                                              r"pattern 're:\(' is not a valid regex"):
        Recipe.load(path)
    with pytest.raises(npr.RecipeError, match=r"per_layer.*'re:\[' is not a valid regex"):
        Recipe((npr.LayerwiseMagnitudePrune(sparsity=0.5, per_layer={"re:[": 0.3}),))


def test_special_files_are_refused(tmp_path):
    import os

    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(npr.RecipeError, match="not a regular file"):
        Recipe.load(fifo)
    with pytest.raises(npr.RecipeError, match="not a regular file"):
        Recipe.load(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    import os

    path = tmp_path / "recipe.yaml"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        recipe().save(path)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["recipe.yaml"]
