"""netpress: compress trained PyTorch models without changing what they predict.

>>> import netpress as npr
>>> result = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8), npr.Distill(epochs=1)],
...                       train=loader, evaluate=loader)          # doctest: +SKIP
>>> result.save("model.npress"); model2 = npr.load("model.npress")  # doctest: +SKIP
"""

from netpress.api import CompressionResult, compress, load
from netpress.config import MethodConfig, Recipe
from netpress.errors import (
    ArtefactError,
    DataError,
    ModelError,
    NetpressError,
    RecipeError,
    SelectionError,
)
from netpress.export.onnx import export_onnx
from netpress.measure.constraints import MaxAccuracyDrop, MaxClassAgreementDrop, MinAgreement
from netpress.prune.depth import DepthPrune
from netpress.prune.posttraining import FisherPrune
from netpress.prune.structured import StructuredPrune
from netpress.prune.unstructured import GlobalMagnitudePrune, LayerwiseMagnitudePrune
from netpress.quant import QAT, Codebook, Quantize, WeightOnly
from netpress.reconstruct import GPTQ, SparseGPT, Wanda
from netpress.recover.label_preserving import LabelPreserve
from netpress.recover.lc import LC
from netpress.recover.methods import Distill, FineTune
from netpress.registry import list_methods, register
from netpress.report import Report
from netpress.search import Choice, Range
from netpress.search import search as search  # the function (the subpackage stays importable)
from netpress.split.method import Split

__all__ = [
    "compress",
    "load",
    "CompressionResult",
    "Report",
    "Recipe",
    "MethodConfig",
    "register",
    "list_methods",
    "GlobalMagnitudePrune",
    "LayerwiseMagnitudePrune",
    "StructuredPrune",
    "DepthPrune",
    "FisherPrune",
    "FineTune",
    "Distill",
    "LabelPreserve",
    "LC",
    "Quantize",
    "QAT",
    "WeightOnly",
    "Codebook",
    "SparseGPT",
    "Wanda",
    "GPTQ",
    "Split",
    "export_onnx",
    "MinAgreement",
    "MaxAccuracyDrop",
    "MaxClassAgreementDrop",
    "search",
    "Range",
    "Choice",
    "NetpressError",
    "RecipeError",
    "SelectionError",
    "DataError",
    "ModelError",
    "ArtefactError",
]

__version__ = "0.1.0"

_SUBMODULES = frozenset({"measure", "export", "models", "datasets", "testing", "prune", "recover",
                         "split"})


def __getattr__(name: str) -> object:
    """Lazy access to subpackages (``npr.measure.EmbeddingTask``) without importing them early."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"netpress.{name}")
    raise AttributeError(f"module 'netpress' has no attribute {name!r}")
