import pytest

from netpress.errors import DataError, RecipeError
from netpress.measure.constraints import (
    MaxAccuracyDrop,
    MaxClassAgreementDrop,
    MinAgreement,
    check_all,
)

REPORT = {"agreement": 0.985, "reference": {"accuracy": 0.92}, "compressed": {"accuracy": 0.914},
          "fidelity": {"worst_class_agreement": 0.95}}


def test_constraints_read_the_report():
    a, d, c = check_all([MinAgreement(0.99), MaxAccuracyDrop(0.01), MaxClassAgreementDrop(0.04)],
                        REPORT)
    assert not a.satisfied and a.slack == pytest.approx(-0.005)
    assert d.satisfied and d.value == pytest.approx(0.006) and d.slack == pytest.approx(0.004)
    assert not c.satisfied and c.value == pytest.approx(0.05)
    assert "VIOLATED" in str(a) and "ok" in str(d)


def test_missing_measurements_and_bad_bounds():
    with pytest.raises(DataError, match="reference.accuracy"):
        MaxAccuracyDrop(0.01).check({"agreement": 1.0})
    with pytest.raises(RecipeError, match="MinAgreement"):
        MinAgreement(99)
