"""Split computing: cut a model into a device head and a server tail with a trained bottleneck.

>>> import netpress as npr
>>> res = npr.compress(model, npr.Split(at="layer2", channels=4, bits=8),
...                    train=loader, evaluate=test_loader)              # doctest: +SKIP
>>> from netpress.split import save_split
>>> save_split(res.model, "out/", example_inputs=x)  # .npress and .onnx  # doctest: +SKIP

* :mod:`~netpress.split.cut`: where and how a model is cut (``torch.fx``);
* :mod:`~netpress.split.bottleneck`: encoder, integer codes, decoder;
* :mod:`~netpress.split.method`: the ``Split`` method (BottleFit's two training stages);
* :mod:`~netpress.split.measure`: bytes per input after entropy coding, device MACs/latency;
* :mod:`~netpress.split.arith`: a static arithmetic coder of the codes (per-channel model);
* :mod:`~netpress.split.context`: the same coder with a context model (each code's table
  chosen by the codes sent before it);
* :mod:`~netpress.split.entropy`: a learned factorized density of the codes (the rate term
  of ``Split(entropy="factorized")``) and the coder's model of it;
* :mod:`~netpress.split.export`: the device and server artefacts and ONNX files.
"""

from netpress.split.arith import (
    CodeModel,
    arith_bytes,
    decode_codes,
    encode_codes,
    fit_code_model,
    load_code_model,
    save_code_model,
)
from netpress.split.bottleneck import Bottleneck, build_bottleneck, quantize_ste
from netpress.split.context import (
    ContextModel,
    context_bytes,
    decode_with_context,
    encode_with_context,
    fit_context_model,
    load_context_model,
    save_context_model,
)
from netpress.split.cut import Cut, cut_model, resolve_cut
from netpress.split.entropy import FactorizedPrior, code_model_from_pmf
from netpress.split.export import save_split
from netpress.split.measure import (
    coded_codes,
    codes_of,
    image_png_bytes,
    split_section,
    train_dictionary,
    transmitted_bytes,
)
from netpress.split.method import Split
from netpress.split.model import DevicePart, ServerPart, SplitModel, find_split

__all__ = [
    "Split",
    "SplitModel",
    "DevicePart",
    "ServerPart",
    "Bottleneck",
    "CodeModel",
    "ContextModel",
    "context_bytes",
    "decode_with_context",
    "encode_with_context",
    "fit_context_model",
    "load_context_model",
    "save_context_model",
    "arith_bytes",
    "decode_codes",
    "encode_codes",
    "fit_code_model",
    "load_code_model",
    "save_code_model",
    "Cut",
    "build_bottleneck",
    "code_model_from_pmf",
    "coded_codes",
    "codes_of",
    "FactorizedPrior",
    "cut_model",
    "find_split",
    "image_png_bytes",
    "quantize_ste",
    "resolve_cut",
    "save_split",
    "split_section",
    "train_dictionary",
    "transmitted_bytes",
]
