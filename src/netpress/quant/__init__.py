"""Quantization: affine maths, observers, BN folding, PTQ, QAT, codebooks, sensitivity.

Importing this package registers its methods (``Quantize``, ``QAT``, ``WeightOnly``,
``Codebook``), its
module types (so artefacts holding quantized layers load) and the packed low-bit tensor
encoding of the artefact.
"""

from netpress.export import _quant_codec  # noqa: F401  (registers the packed_int encoding)
from netpress.quant.codebook import Codebook
from netpress.quant.lowbit import WeightOnly
from netpress.quant.modules import ActQuant, QuantConv2d, QuantLinear
from netpress.quant.ptq import Quantize
from netpress.quant.qat import QAT

__all__ = ["Quantize", "QAT", "WeightOnly", "Codebook", "ActQuant", "QuantConv2d", "QuantLinear"]
