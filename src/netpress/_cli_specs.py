"""Turning the CLI's ``--model``, ``--weights`` and ``--data`` strings into objects.

``--model`` is a built-in model name (``netpress.models.MODELS``), a ``.npress`` artefact,
``hf:DIR`` (a local ``transformers`` directory), or ``package.module:factory`` (a factory in
*your* code, imported because you named it).
``--data`` is ``digits``, ``cifar10:DIR``, ``mnist:DIR``, ``fashion-mnist:DIR``,
``text:FILE`` (texts tokenized with the model's tokenizer: :mod:`netpress.text_data`) or
``package.module:factory`` returning a dict with ``train``/``calibration``/``evaluate``.
``--task`` left out is chosen from the data and the model (:func:`resolve_task`).
``package.module`` is imported as ``python -m`` would: the current directory comes first on
the import path, so ``mymodels:build`` finds ``./mymodels.py``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.errors import ArtefactError, DataError, ModelError

__all__ = [
    "DATA_FORM",
    "add_text_data_args",
    "load_weights",
    "resolve_data",
    "resolve_model",
    "resolve_task",
    "source_record",
    "state_fingerprint",
]

#: What a ``--data package.module:factory`` must return (shown in --help and errors).
DATA_FORM = ("a dict with any of the keys 'train', 'calibration' and 'evaluate', each a "
             "re-iterable of (inputs, labels) batches such as a torch DataLoader (labels may "
             "be None); e.g. def data(): return {'train': DataLoader(...), "
             "'evaluate': DataLoader(...)}")


def _importable_from(cwd: str | None) -> None:
    """Put ``cwd`` (default: the current directory) first on ``sys.path``, as ``python -m``."""
    folder = os.path.abspath(cwd or os.getcwd())
    if folder not in (os.path.abspath(p or ".") for p in sys.path):
        sys.path.insert(0, folder)
    importlib.invalidate_caches()


def _factory(spec: str, what: str, cwd: str | None = None) -> Any:
    module_name, _, attr = spec.partition(":")
    _importable_from(cwd)
    error = ModelError if what == "model" else DataError
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise error(f"--{what} {spec!r}: cannot import {attr!r} from {module_name!r} (looked "
                    f"in {os.path.abspath(cwd or os.getcwd())} and the installed packages): "
                    f"{exc}") from None
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


def resolve_model(spec: str, weights: str | None = None, *,
                  cwd: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see module docs) and load ``weights`` if given;
    ``package.module:factory`` is imported with ``cwd`` (default: the current directory)
    first on the import path."""
    if spec.endswith(".npress"):
        from netpress.api import load

        model = load(spec)
    elif spec.startswith("hf:"):  # a local transformers directory
        from netpress.models.hf import from_pretrained

        model = from_pretrained(spec[3:])
    elif ":" in spec:
        model = _factory(spec, "model", cwd)
        if not isinstance(model, nn.Module):
            raise ModelError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    else:
        from netpress.models import build_model

        model = build_model(spec)
    if weights:
        load_weights(model, weights)
    return model.eval()


def add_text_data_args(parser: Any) -> None:
    """The ``--tokenizer`` and ``--max-length`` options of commands that take
    ``--data text:FILE`` (an :class:`argparse.ArgumentParser`)."""
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for --data "
                        "text:FILE (default: the --model hf:DIR directory)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="--data text:FILE: tokens per text at most (default 128)")


def tokenizer_dir(model_spec: str | None, tokenizer: str | None) -> str:
    """Where ``text:FILE`` data finds its tokenizer: ``--tokenizer DIR``, else the
    ``--model hf:DIR`` directory."""
    if tokenizer:
        return tokenizer
    if model_spec and model_spec.startswith("hf:"):
        return model_spec[3:]
    raise DataError(f"--data text:FILE is tokenized with the model's tokenizer, and --model "
                    f"{model_spec!r} is not a transformers directory (hf:DIR): give "
                    f"--tokenizer DIR (a directory holding the tokenizer's files)")


def _decoder_start(model_spec: str | None) -> int | None:
    """The decoder start token of an encoder-decoder ``hf:DIR`` model (its ``config.json``:
    ``decoder_start_token_id``, else ``pad_token_id``), None for any other model."""
    if not model_spec or not model_spec.startswith("hf:"):
        return None
    path = Path(model_spec[3:]) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not config.get("is_encoder_decoder"):
        return None
    start = config.get("decoder_start_token_id")
    start = config.get("pad_token_id") if start is None else start
    if not isinstance(start, int):
        raise DataError(f"{path}: an encoder-decoder model without decoder_start_token_id or "
                        "pad_token_id; set one so that text can be fed to its decoder")
    return start


def resolve_data(spec: str, *, batch_size: int = 128, train_limit: int | None = None,
                 eval_limit: int | None = None, seed: int = 0, cwd: str | None = None,
                 model_spec: str | None = None, tokenizer: str | None = None,
                 max_length: int = 128) -> dict[str, Any]:
    """Data loaders (``train``, ``calibration``, ``evaluate``) for a ``--data`` spec
    (a factory's dict is returned as it is; see :data:`DATA_FORM`). ``text:FILE`` is
    tokenized with the tokenizer of :func:`tokenizer_dir` into batches of ``batch_size``
    texts of at most ``max_length`` tokens."""
    from netpress import datasets as ds

    name, _, root = spec.partition(":")
    if name == "text":
        from netpress.text_data import load_tokenizer, text_data

        tok = load_tokenizer(tokenizer_dir(model_spec, tokenizer))
        return text_data(root, tok, batch_size=batch_size, max_length=max_length,
                         eval_limit=eval_limit, train_limit=train_limit, seed=seed,
                         decoder_start=_decoder_start(model_spec))
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
        out = _factory(spec, "data", cwd)
        if not isinstance(out, dict) or not set(out) & {"train", "calibration", "evaluate"}:
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise DataError(f"--data {spec!r} returned {got}; it must return {DATA_FORM}")
        return out
    else:
        raise DataError(f"--data {spec!r}: use digits, cifar10:DIR, mnist:DIR, "
                        f"fashion-mnist:DIR, text:FILE or package.module:factory")
    train = _limit(train, train_limit)
    test = _limit(test, eval_limit)
    calib = _limit(train, 512)
    return {"train": ds.loader(train, batch_size=batch_size, shuffle=True, seed=seed),
            "calibration": ds.loader(calib, batch_size=batch_size),
            "evaluate": ds.loader(test, batch_size=256)}


def resolve_task(task: str | None, model: nn.Module, data: dict[str, Any]) -> str:
    """``--task``, or when it is left out the task the model and data call for: on text
    batches (dicts with ``input_ids``) without labels, ``language-model`` for a causal
    language model (``…ForCausalLM`` / ``…LMHeadModel``) or batches with decoder inputs (an
    encoder-decoder model reading its text), ``sentence-embedding`` for an
    encoder's hidden states, ``classification`` for a sequence classifier; otherwise
    ``classification``."""
    if task is not None:
        return task
    first = next(iter(data.get("evaluate") or data.get("calibration") or []), None)
    inputs, labels = first if isinstance(first, (tuple, list)) and len(first) == 2 \
        else (first, None)
    if not (isinstance(inputs, dict) and "input_ids" in inputs) or labels is not None:
        return "classification"
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")) or "decoder_input_ids" in inputs:
        return "language-model"
    if name.endswith(("ForSequenceClassification", "ForImageClassification")):
        return "classification"
    return "sentence-embedding"


def _limit(dataset: Any, n: int | None) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(n))


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``model``'s state_dict."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_record(model: str, weights: str | None, data: str, eval_limit: int | None,
                  reference: nn.Module) -> dict[str, Any]:
    """The ``--model``/``--weights``/``--data`` of a ``compress`` run with absolute paths,
    and the ``reference``'s :func:`state_fingerprint`; stored in ``report.json`` so that
    ``netpress export`` can rebuild the same reference and evaluation data, from any
    folder, and tell when it cannot (a reference without weights is initialised at random)."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    name, sep, root = data.partition(":")
    builtin = name in ("cifar10", "mnist", "fashion-mnist", "fashion_mnist", "text")
    return {
        "model": absolute(model) if model.endswith(".npress") else
        f"hf:{absolute(model[3:])}" if model.startswith("hf:") else model,
        "weights": absolute(weights) if weights else None,
        "data": f"{name}:{absolute(root)}" if builtin and sep else data,
        "eval_limit": eval_limit,
        "cwd": os.getcwd(),
        "reference_sha256": state_fingerprint(reference),
    }
