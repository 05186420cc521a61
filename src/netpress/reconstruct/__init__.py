"""Layer-wise reconstruction from calibration data: one-shot compression that keeps each
layer's outputs (SparseGPT, Wanda, GPTQ).

The engine (:mod:`netpress.reconstruct.engine`) runs the calibration data through the model
layer group by layer group, collects each layer's input statistics (from the model as
compressed so far), fits the layer and writes it back. The maths are pure functions
(:mod:`~netpress.reconstruct.obs`, :mod:`~netpress.reconstruct.sparsegpt`,
:mod:`~netpress.reconstruct.gptq`, :mod:`~netpress.reconstruct.lstsq`). Importing the
package registers the methods, the group-quantized layer types and the ``nm_sparse``
artefact encoding.
"""

from netpress.export import _nm_codec  # noqa: F401  (registers the nm_sparse encoding)
from netpress.reconstruct.engine import LayerStats, collect_statistics, run_sequential
from netpress.reconstruct.gptq import gptq_quantize, gptq_round
from netpress.reconstruct.modules import GroupQuantConv, GroupQuantLinear
from netpress.reconstruct.quantize import GPTQ
from netpress.reconstruct.sparse import SparseGPT, Wanda

__all__ = ["SparseGPT", "Wanda", "GPTQ", "gptq_round", "gptq_quantize", "collect_statistics",
           "run_sequential", "LayerStats", "GroupQuantLinear", "GroupQuantConv"]
