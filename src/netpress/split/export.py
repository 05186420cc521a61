"""Write a split model as its two deployable halves: ``.npress`` artefacts and ONNX files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from netpress._inputs import take_batch
from netpress.errors import ArtefactError
from netpress.split.model import SplitModel

__all__ = ["save_split"]


def save_split(split: SplitModel, directory: str | Path, example_inputs: Any, *,
               onnx: bool = True, recipe: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``device.npress`` / ``server.npress`` (and ``device.onnx`` / ``server.onnx``;
    with a learned entropy model also ``code_model.json``, the arithmetic coder's tables both
    sides hold, :func:`~netpress.split.arith.load_code_model`).

    The device part maps the model's inputs to the ``uint8`` codes, the server part maps
    codes to the model's outputs; each artefact is verified to reproduce its part's outputs
    on ``example_inputs`` (one row is used) and loads without netpress's classes.
    """
    from netpress.export import save_artefact

    out_dir = Path(directory)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtefactError(f"save_split: '{out_dir}' is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    one = take_batch(example_inputs, 1)
    device, server = split.device_part().eval(), split.server_part().eval()
    with torch.no_grad():
        codes = device(one)
    meta = {"split": {"at": split.at, "bits": split.bottleneck.quant.bits,
                      "code_shape": list(codes.shape[1:])}}
    paths = {"device": out_dir / "device.npress", "server": out_dir / "server.npress"}
    prior = split.bottleneck.prior
    if prior is not None:
        from netpress.split.arith import save_code_model

        meta["split"]["channel_dim"] = prior.channel_dim
        paths["code_model"] = save_code_model(prior.code_model(), out_dir / "code_model.json")
    save_artefact(paths["device"], device, recipe=recipe, metadata=meta, example_inputs=one)
    save_artefact(paths["server"], server, recipe=recipe, metadata=meta, example_inputs=codes)
    if onnx:
        from netpress.export.onnx import export_onnx

        paths["device_onnx"] = export_onnx(device, out_dir / "device.onnx", one)
        paths["server_onnx"] = export_onnx(server, out_dir / "server.onnx", codes)
    return paths
