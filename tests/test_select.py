import pytest

from netpress.errors import SelectionError
from netpress.select import matches, resolve_per_layer, select_names, weighted_modules
from netpress.testing import TinyCNN

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]


def test_exact_and_regex():
    assert matches("conv1", "conv1") and not matches("conv1", "layer1.0.conv1")
    assert matches("re:layer1\\..*", "layer1.0.conv2")
    assert not matches("re:layer1", "layer1.0.conv2")  # fullmatch, not search


def test_select_with_ignore():
    got = select_names(NAMES, ["re:layer.*"], ["re:.*conv2"])
    assert got == ["layer1.0.conv1", "layer2.0.conv1"]


def test_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(SelectionError, match="'re:layer9.*' matches no layer.*conv1"):
        select_names(NAMES, ["re:layer9.*"])
    with pytest.raises(SelectionError, match="'fc9'"):
        select_names(NAMES, ["re:.*"], ["fc9"])


def test_bad_regex():
    with pytest.raises(SelectionError, match="not a valid regex"):
        select_names(NAMES, ["re:(unclosed"])


def test_per_layer_precedence():
    got = resolve_per_layer(NAMES, {"re:layer.*": 0.5, "layer1.0.conv2": 0.9,
                                    "re:.*conv1": 0.1}, 0.2)
    assert got == {"conv1": 0.1, "layer1.0.conv1": 0.5, "layer1.0.conv2": 0.9,
                   "layer2.0.conv1": 0.5, "fc": 0.2}
    with pytest.raises(SelectionError, match="'nope' matches no selected layer"):
        resolve_per_layer(NAMES, {"nope": 0.3}, 0.0)


def test_weighted_modules_finds_conv_and_linear_only():
    assert list(weighted_modules(TinyCNN())) == ["conv1", "conv2", "fc"]


def test_pattern_fields_must_be_lists_of_strings():
    import netpress as npr

    for bad in ("re:.*", ["conv1", 3]):
        with pytest.raises(npr.RecipeError, match="layers must be a list of layer names"):
            npr.GlobalMagnitudePrune(layers=bad)  # type: ignore[arg-type]
        with pytest.raises(npr.RecipeError, match="Quantize: ignore must be a list"):
            npr.Quantize(ignore=bad)  # type: ignore[arg-type]
