"""Turning the CLI's ``--model``, ``--weights`` and ``--data`` strings into objects.

``--model`` is a built-in model name (``netpress.models.MODELS``), a ``.npress`` artefact,
``hf:DIR`` (a local ``transformers`` directory), or ``package.module:factory`` (a factory in
*your* code, imported because you named it).
``--data`` is ``digits``, ``cifar10:DIR``, ``mnist:DIR``, ``fashion-mnist:DIR`` or
``package.module:factory`` returning a dict with ``train``/``calibration``/``evaluate``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.errors import ArtefactError, DataError, ModelError

__all__ = ["resolve_model", "resolve_data", "load_weights"]


def _factory(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise (ModelError if what == "model" else DataError)(
            f"--{what} {spec!r}: cannot import {attr!r} from {module_name!r}: {exc}") from None
    return obj() if callable(obj) else obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ArtefactError(f"--weights {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ArtefactError(f"--weights {str(p)!r} is not a state dict torch can load "
                                f"safely: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ArtefactError(f"--weights {str(p)!r} holds a {type(state).__name__}, not a state "
                            f"dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtefactError(f"--weights {str(p)!r} does not fit the model: {exc}") from None
    return model


def resolve_model(spec: str, weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see module docs) and load ``weights`` if given."""
    if spec.endswith(".npress"):
        from netpress.api import load

        model = load(spec)
    elif spec.startswith("hf:"):  # a local transformers directory
        from netpress.models.hf import from_pretrained

        model = from_pretrained(spec[3:])
    elif ":" in spec:
        model = _factory(spec, "model")
        if not isinstance(model, nn.Module):
            raise ModelError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    else:
        from netpress.models import build_model

        model = build_model(spec)
    if weights:
        load_weights(model, weights)
    return model.eval()


def resolve_data(spec: str, *, batch_size: int = 128, train_limit: int | None = None,
                 eval_limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Data loaders (``train``, ``calibration``, ``evaluate``) for a ``--data`` spec."""
    from netpress import datasets as ds

    name, _, root = spec.partition(":")
    if name == "digits":
        train, test = ds.digits(seed=seed)
    elif name == "cifar10":
        train = ds.cifar10_jpeg_train(root, limit=train_limit or 5000, seed=seed)
        test = ds.cifar10_exact_test(root)
    elif name == "mnist":
        train, test = ds.mnist_train(root), ds.mnist_test(root)
    elif name in ("fashion-mnist", "fashion_mnist"):
        train, test = ds.fashion_mnist(root, split="train"), ds.fashion_mnist(root, split="test")
    elif ":" in spec:
        out = _factory(spec, "data")
        if not isinstance(out, dict) or not set(out) & {"train", "calibration", "evaluate"}:
            raise DataError(f"--data {spec!r} must return a dict with train/calibration/evaluate")
        return out
    else:
        raise DataError(f"--data {spec!r}: use digits, cifar10:DIR, mnist:DIR, "
                        f"fashion-mnist:DIR, or package.module:factory")
    train = _limit(train, train_limit)
    test = _limit(test, eval_limit)
    calib = _limit(train, 512)
    return {"train": ds.loader(train, batch_size=batch_size, shuffle=True, seed=seed),
            "calibration": ds.loader(calib, batch_size=batch_size),
            "evaluate": ds.loader(test, batch_size=256)}


def _limit(dataset: Any, n: int | None) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(n))
