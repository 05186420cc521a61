"""Is the measurement itself believable? Warnings about the reference, not the compression.

A reference that scores near chance on the evaluation data almost always sees inputs
prepared differently from how it was trained (pixels scaled by 1/255 where the loader
normalises with a mean and std, or the other way round). Every agreement figure measured
on such data is meaningless, so the report says so loudly and names the preprocessing.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BUILTIN_PREPROCESSING", "chance_level", "input_statistics", "reference_warning"]

#: What netpress's built-in loaders do to the pixels (see :mod:`netpress.datasets`).
BUILTIN_PREPROCESSING = (
    "digits: /16, then standardised with the train split's mean and std",
    "CIFAR-10: /255, then per channel mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)",
    "MNIST: /255, then mean 0.1307, std 0.3081",
    "Fashion-MNIST: /255, then mean 0.2860, std 0.3530",
)


def chance_level(labels: torch.Tensor) -> float:
    """The accuracy of always predicting the most common label (1/C for balanced data)."""
    flat = labels.reshape(-1).long()
    if flat.numel() == 0:
        return 0.0
    return float(torch.bincount(flat - flat.min()).max()) / flat.numel()


def input_statistics(inputs: Any) -> dict[str, float] | None:
    """``min``, ``max``, ``mean`` and ``std`` of a float input tensor (``None`` otherwise)."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() \
            or inputs.numel() == 0:
        return None
    x = inputs.detach().double()
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()),
            "std": float(x.std()) if x.numel() > 1 else 0.0}


def reference_warning(accuracy: float | None, labels: torch.Tensor | None, *,
                      preprocessing: str | None = None,
                      inputs: dict[str, float] | None = None,
                      margin: float = 0.1) -> str | None:
    """A warning when the reference's ``accuracy`` is within ``margin`` of the way from
    chance (:func:`chance_level`) to perfect, else ``None`` (also when every label is the
    same, where chance tells nothing).

    The text names ``preprocessing`` (what the loader did, if known; otherwise what every
    built-in loader does) and the evaluation ``inputs``' statistics, so that a mismatch
    between training and evaluation preprocessing can be spotted.
    """
    if accuracy is None or labels is None or labels.numel() == 0:
        return None
    chance = chance_level(labels)
    if chance >= 1.0 or accuracy > chance + margin * (1.0 - chance):
        return None  # (one label only: chance tells nothing)
    given = (f"The evaluation data went through {preprocessing}." if preprocessing else
             "netpress's built-in loaders apply: " + "; ".join(BUILTIN_PREPROCESSING) + ".")
    seen = "" if inputs is None else (
        f" The evaluation inputs have mean {inputs['mean']:.3g}, std {inputs['std']:.3g}, "
        f"range {inputs['min']:.3g} to {inputs['max']:.3g}.")
    return (f"SUSPICIOUS REFERENCE: its accuracy is {100 * accuracy:.1f}%, near chance "
            f"({100 * chance:.1f}%, the most common label's share), so every agreement figure "
            f"below compares two models that do not work on this data. Either the evaluation "
            f"inputs are preprocessed differently from the reference's training data, or the "
            f"reference is untrained (were its weights loaded?). {given}{seen} Evaluate the "
            f"reference on data prepared exactly as for its training (e.g. your own loader "
            f"through --data package.module:factory).")
