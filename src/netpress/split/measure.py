"""What split computing costs: bytes sent per input, the device's share of the work.

* :func:`transmitted_bytes`: the device part's ``uint8`` codes for each input, coded alone
  with zstd (the artefact's entropy coder; bare frames), optionally with a zstd dictionary
  trained on codes of training inputs (:func:`train_dictionary`) that both sides hold;
  with training inputs the section also gives the bytes of the static arithmetic coder
  (:mod:`netpress.split.arith`), its per-channel model fitted on the same codes, or, when
  the bottleneck learned an entropy model (``entropy="factorized"``), that model's pmf
  (:func:`coded_codes`; no training inputs needed); without one, for ``(C, H, W)`` codes,
  also the context-model coder's (:mod:`netpress.split.context`, tables up to 256 KiB);
* :func:`image_png_bytes`: the PNG bytes of each raw input image (8-bit, lossless), the
  baseline a device would otherwise send;
* :func:`split_section`: the report section: bytes per input (mean, median, p95, with and
  without a dictionary) against the input's PNG bytes, code shape and bits, MACs of the
  device part against the whole original model, and their latencies (interleaved rounds).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress._inputs import move_to, take_batch
from netpress.errors import ModelError
from netpress.measure.activations import zstd_codec
from netpress.measure.collect import evaluating, model_device
from netpress.split.arith import CodeModel, arith_bytes, fit_code_model
from netpress.split.context import DEFAULT_OFFSETS, context_bytes, fit_context_model
from netpress.split.model import SplitModel

__all__ = ["codes_of", "coded_codes", "transmitted_bytes", "train_dictionary",
           "image_png_bytes", "split_section"]

_CONTEXT_MODEL_LIMIT = 256 * 1024  # bytes of context tables both ends would hold


def codes_of(split: SplitModel, data: Iterable[Any], max_batches: int | None = None
             ) -> list[np.ndarray]:
    """The uint8 codes the device sends, one array per input, in data order."""
    device = split.device_part()
    out: list[np.ndarray] = []
    with torch.no_grad(), evaluating(device):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            codes = device(move_to(x, model_device(split))).cpu().numpy()
            out.extend(np.ascontiguousarray(c) for c in codes)
    return out


def coded_codes(split: SplitModel, codes: list[np.ndarray]) -> tuple[CodeModel, np.ndarray]:
    """The learned entropy model's arithmetic-coder model and each input's coded bytes (codes
    moved to channels first, as the coder reads them)."""
    prior = split.bottleneck.prior
    if prior is None:
        raise ModelError("Split: this bottleneck has no learned entropy model; build it with "
                         "entropy='factorized' or fit one with fit_code_model")
    model = prior.code_model()
    ordered = [np.moveaxis(c, -1, 0) if prior.channel_dim == -1 else c for c in codes]
    return model, arith_bytes(ordered, model)


def train_dictionary(codes: list[np.ndarray], size: int = 4096, level: int = 19) -> bytes:
    """A zstd dictionary of at most ``size`` bytes trained on code arrays of training inputs."""
    import zstandard

    samples: list[bytes | bytearray | memoryview] = [c.tobytes() for c in codes]
    return zstandard.train_dictionary(size, samples, level=level).as_bytes()


def transmitted_bytes(codes: list[np.ndarray], dictionary: bytes | None = None,
                      level: int = 19) -> np.ndarray:
    """Bytes of each input's codes after zstd (one bare frame per input)."""
    codec = zstd_codec(level, dictionary)
    return np.array([len(codec.compress(c.tobytes())) for c in codes], dtype=np.int64)


def image_png_bytes(data: Iterable[Any], max_batches: int | None = None) -> np.ndarray | None:
    """PNG bytes of each input image rendered to 8 bits (min-max per image, as the report's
    thumbnails); ``None`` when the inputs are not images."""
    from netpress.report.html import _image_batch, _to_pixels, encode_png

    sizes: list[int] = []
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = _image_batch(x)
        if images is None:
            return None
        sizes.extend(len(encode_png(_to_pixels(img))) for img in images)
    return np.array(sizes, dtype=np.int64)


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}


def _context_coded(train_codes: list[np.ndarray], codes: list[np.ndarray], bits: int,
                   limit: int = _CONTEXT_MODEL_LIMIT) -> dict[str, Any]:
    """The context coder's bytes (:mod:`netpress.split.context`, fitted on ``train_codes``)
    for ``(C, H, W)`` codes, with as many of its default neighbours (left, up, previous
    channel) as keep the model within ``limit`` bytes; nothing for other codes or when not
    even one fits."""
    if codes[0].ndim != 3:
        return {}
    offsets = DEFAULT_OFFSETS
    while offsets and (2 * codes[0].shape[0] * (2 ** bits + 1) ** len(offsets)
                       * 2 ** bits) > limit:
        offsets = offsets[:-1]
    if not offsets:
        return {}
    model = fit_context_model(np.stack(train_codes), bits, offsets)
    return {"context_offsets": [list(o) for o in offsets], "context_model_bytes": model.nbytes,
            "bytes_per_input_context": _stats(context_bytes(codes, model))}


def split_section(reference: nn.Module, split: SplitModel, evaluate: Iterable[Any], *,
                  train: Iterable[Any] | None = None, example_inputs: Any = None,
                  max_batches: int | None = None, dictionary_batches: int = 20,
                  threads: int = 1, latency_repeats: int = 20) -> dict[str, Any]:
    """The split report section, JSON-ready (see the module doc)."""
    from netpress.measure.latency import measure_latency_interleaved
    from netpress.measure.macs import count_macs

    codes = codes_of(split, evaluate, max_batches)
    sent = transmitted_bytes(codes)
    out: dict[str, Any] = {
        "at": split.at, "bits": split.bottleneck.quant.bits,
        "code_shape": list(codes[0].shape), "code_values": int(codes[0].size),
        "inputs": len(codes), "bytes_per_input": _stats(sent),
    }
    if train is not None:
        train_codes = codes_of(split, train, dictionary_batches)
        dictionary = train_dictionary(train_codes)
        out["dictionary_bytes"] = len(dictionary)
        out["bytes_per_input_with_dictionary"] = _stats(transmitted_bytes(codes, dictionary))
        if split.bottleneck.prior is None:
            model = fit_code_model(train_codes, out["bits"])
            out["code_model_bytes"] = model.nbytes
            out["bytes_per_input_arithmetic"] = _stats(arith_bytes(codes, model))
            out.update(_context_coded(train_codes, codes, out["bits"]))
    if split.bottleneck.prior is not None:
        model, sizes = coded_codes(split, codes)
        out["entropy_model"] = "factorized"
        out["code_model_bytes"] = model.nbytes
        out["bytes_per_input_arithmetic"] = _stats(sizes)
    png = image_png_bytes(evaluate, max_batches)
    if png is not None and len(png) == len(sent):
        best = min(out[k]["mean"] for k in ("bytes_per_input", "bytes_per_input_with_dictionary",
                                             "bytes_per_input_arithmetic",
                                             "bytes_per_input_context") if k in out)
        out["input_png_bytes"] = _stats(png)
        out["reduction_vs_png"] = float(png.mean()) / best if best else None
    if example_inputs is not None:
        one = take_batch(example_inputs, 1)
        device = split.device_part().eval()
        out["device_macs"] = count_macs(device, one)
        out["reference_macs"] = count_macs(reference, one)
        out["device_macs_fraction"] = out["device_macs"] / max(1, out["reference_macs"])
        dev_t, ref_t = measure_latency_interleaved([device, reference], one, batch_sizes=(1,),
                                                   threads=threads, repeats=latency_repeats)
        out["device_latency_ms"] = dev_t[1].median_ms
        out["reference_latency_ms"] = ref_t[1].median_ms
    return out
