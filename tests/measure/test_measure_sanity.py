"""A reference near chance gets a loud warning that names the data's preprocessing."""

from __future__ import annotations

import pytest
import torch

from netpress.datasets import digits, fashion_mnist, loader, preprocessing_of
from netpress.measure import compare
from netpress.measure.sanity import chance_level, input_statistics, reference_warning
from netpress.report import ReportWarning
from netpress.report.render import to_markdown
from netpress.report.rows import rows


def test_chance_level_and_input_statistics_by_hand() -> None:
    assert chance_level(torch.tensor([0, 1, 2, 3] * 25)) == 0.25
    assert chance_level(torch.tensor([1, 1, 1, 2])) == 0.75
    stats = input_statistics(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    assert stats == pytest.approx({"min": 0.0, "max": 1.0, "mean": 0.5, "std": 0.40825},
                                  abs=1e-5)
    assert input_statistics(torch.tensor([1, 2])) is None  # integer token ids: no statistics


def test_warning_fires_near_chance_only() -> None:
    labels = torch.arange(10).repeat(100)  # balanced: chance is 10%
    text = reference_warning(0.102, labels,
                             preprocessing="netpress's Fashion-MNIST loader: pixels / 255, "
                                           "then (x - mean) / std with mean 0.286, std 0.353",
                             inputs={"min": 0.0, "max": 1.0, "mean": 0.286, "std": 0.353})
    assert text is not None
    assert "accuracy is 10.2%, near chance (10.0%" in text
    assert "Fashion-MNIST loader: pixels / 255, then (x - mean) / std with mean 0.286" in text
    assert "mean 0.286, std 0.353, range 0 to 1" in text
    assert reference_warning(0.19, labels) is not None  # 10% of the way from chance to 100%
    assert reference_warning(0.20, labels) is None
    assert reference_warning(0.9, labels) is None
    assert reference_warning(None, labels) is None and reference_warning(0.1, None) is None
    assert reference_warning(1.0, torch.zeros(8, dtype=torch.long)) is None  # one class only
    every = reference_warning(0.1, labels)
    assert every is not None and "Fashion-MNIST: /255, then mean 0.2860, std 0.3530" in every


def test_builtin_loaders_carry_their_preprocessing() -> None:
    train, test = digits(seed=0)
    text = preprocessing_of(loader(torch.utils.data.Subset(test, range(10))))
    assert text is not None and text.startswith("netpress's digits loader: pixel values / 16")
    assert preprocessing_of(train) == text
    assert preprocessing_of([(torch.zeros(1), None)]) is None


@pytest.mark.shared_data
def test_fashion_mnist_names_its_normalisation(shared_data) -> None:  # type: ignore[no-untyped-def]
    test = fashion_mnist(shared_data, split="test")
    assert preprocessing_of(loader(test)) == ("netpress's Fashion-MNIST loader: pixels / 255, "
                                              "then (x - mean) / std with mean 0.286, std 0.353")


def test_report_of_a_reference_near_chance_warns_loudly() -> None:
    torch.manual_seed(0)
    _, test = digits(seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))  # untrained
    report = compare(model, model, data=loader(test, batch_size=128), latency_batch_sizes=())
    (warning,) = report["warnings"]
    assert warning.startswith("SUSPICIOUS REFERENCE: its accuracy is ")
    assert "netpress's digits loader: pixel values / 16" in warning
    assert to_markdown(report).splitlines()[2] == f"> **Warning:** {warning}"
    assert rows(report)[0][0] == "top-1 accuracy"
    import netpress as npr

    with pytest.warns(ReportWarning, match="SUSPICIOUS REFERENCE"):
        npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.1)],
                     evaluate=loader(test, batch_size=128), latency_batch_size=2)
