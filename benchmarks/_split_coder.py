"""The arithmetic coder a split benchmark sends the codes with: ``--coder arith`` (the
per-channel model of :mod:`netpress.split.arith`, fitted on 2,000 train images' codes) or
``--coder context`` (the context model of :mod:`netpress.split.context`, fitted on
``--coder-fit`` train images' codes, 20,000 by default, conditioned on ``--context``)."""

from __future__ import annotations

import argparse

import numpy as np

from netpress.split import (
    CodeModel,
    ContextModel,
    arith_bytes,
    context_bytes,
    decode_codes,
    decode_with_context,
    encode_codes,
    encode_with_context,
    fit_code_model,
    fit_context_model,
)

L, U, P = (0, 0, -1), (0, -1, 0), (-1, 0, 0)
CONTEXTS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "none": (), "L": (L,), "U": (U,), "P": (P,), "L+U": (L, U), "L+P": (L, P),
    "U+P": (U, P), "P+PP": (P, (-2, 0, 0)), "L+U+P": (L, U, P),
    "L+U+UL": (L, U, (0, -1, -1)), "L+U+P+PP": (L, U, P, (-2, 0, 0)),
    "L+U+P+UL": (L, U, P, (0, -1, -1)), "L+U+P+PR": (L, U, P, (-1, 0, 1)),
    "L+U+P+PD": (L, U, P, (-1, 1, 0)),
}


def coder_options(p: argparse.ArgumentParser) -> None:
    """``--coder``, ``--coder-fit`` and ``--context``."""
    p.add_argument("--coder", choices=("arith", "context"), default="arith",
                   help="per-channel arithmetic coder, or the context-model one")
    p.add_argument("--coder-fit", type=int, default=0,
                   help="train images whose codes fit the coder (0: 2,000 for arith, "
                        "20,000 for context)")
    p.add_argument("--context", choices=tuple(CONTEXTS), default="L+U+P",
                   help="the context coder's neighbours: L left, U up, P previous channel, "
                        "PP two channels back, UL up-left, PR/PD previous channel right/down")


def fit_count(args: argparse.Namespace) -> int:
    """How many train images' codes the coder is fitted on."""
    return args.coder_fit or (20000 if args.coder == "context" else 2000)


def fit_coder(codes: list[np.ndarray], args: argparse.Namespace) -> CodeModel | ContextModel:
    """The coder's model fitted on ``codes`` (``args.bits``-bit)."""
    if args.coder == "context":
        return fit_context_model(np.stack(codes), args.bits, CONTEXTS[args.context])
    return fit_code_model(codes, args.bits)


def coded_bytes(codes: list[np.ndarray], model: CodeModel | ContextModel) -> np.ndarray:
    """Each input's coded bytes."""
    if isinstance(model, ContextModel):
        return context_bytes(codes, model)
    return arith_bytes(codes, model)


def ideal_bytes(codes: list[np.ndarray], model: CodeModel | ContextModel) -> float:
    """Mean ``sum -log2 p / 8`` of the inputs' codes under the model."""
    return float(np.mean([model.ideal_bits(c) / 8 for c in codes]))


def decodes_back(codes: list[np.ndarray], model: CodeModel | ContextModel) -> bool:
    """Whether every input of ``codes`` decodes back exactly."""
    if isinstance(model, ContextModel):
        return all(np.array_equal(decode_with_context(encode_with_context(c, model), model), c)
                   for c in codes)
    return all(np.array_equal(decode_codes(encode_codes(c, model), model, c.shape), c)
               for c in codes)
