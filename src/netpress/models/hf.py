"""Hugging Face ``transformers`` directories in and out, with no hub access.

* :func:`from_pretrained` loads a local directory (``config.json`` + safetensors weights) with
  ``local_files_only=True``; a directory written by :func:`save_pretrained` in the *padded*
  layout is shrunk back to the compact pruned model.
* :func:`save_pretrained` writes a (compressed) ``transformers`` model as a directory that
  ``transformers``' own ``from_pretrained`` loads, in one of two layouts:

  - **exact**: every layer keeps the same head count and FFN width and the architecture's
    config can say so (``intermediate_size``, and ``num_attention_heads`` /
    ``num_key_value_heads`` where the config has an explicit ``head_dim``): the config is
    rewritten and the directory is as small and fast as the compressed model;
  - **padded**: anything else that pruning did inside the blocks (per-layer head counts and
    FFN widths; BERT-style heads, whose config ties the head size to ``hidden_size``): every
    tensor is written at the original shape with the removed heads and neurons as zero rows
    and columns, which computes exactly the same function. ``config.json`` then carries a
    ``netpress`` entry with the compact shapes, and :func:`from_pretrained` cuts the zeros
    away again.

  Quantized weights are written dequantized (float32): a ``transformers`` directory has no
  integer-weight layer netpress could use. Unstructured zeros stay as zeros. What cannot be
  written is refused with a :class:`~netpress.errors.ModelError` saying why: a pruned
  residual stream (hidden size; zero padding would change the layer norms' statistics),
  activation quantizers (``DynamicQuantize``'s Linear layers quantize their inputs at run
  time; its int8 embedding tables are weight-only and are written as float tables), any
  other netpress-only layer. The written directory is loaded back
  with ``transformers`` and checked against the model before it replaces ``path``.

``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress._inputs import Inputs, call_model, primary_output
from netpress.errors import ArtefactError, ModelError

__all__ = ["from_pretrained", "save_pretrained", "is_transformers_model", "transformers_spec",
           "build_from_spec", "example_text_inputs", "LAYOUT_KEY"]

#: The ``config.json`` entry a padded directory carries (compact shapes + size attributes).
LAYOUT_KEY = "netpress"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                    "sentencepiece.bpe.model", "added_tokens.json", "modules.json",
                    "sentence_bert_config.json", "config_sentence_transformers.json")
# config field -> (parameter-name suffixes, dimension of the weight holding the size, per-head)
_SIZE_RULES: dict[str, tuple[tuple[str, ...], int, bool]] = {
    "intermediate_size": ((".mlp.up_proj.weight", ".mlp.gate_proj.weight",
                           ".intermediate.dense.weight", ".mlp.fc1.weight"), 0, False),
    "ffn_dim": ((".fc1.weight",), 0, False),
    "n_inner": ((".mlp.c_fc.weight",), 1, False),
    "num_attention_heads": ((".self_attn.q_proj.weight", ".attn.q_proj.weight"), 0, True),
    "num_key_value_heads": ((".self_attn.k_proj.weight", ".attn.k_proj.weight"), 0, True),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - an optional dependency
        raise ModelError("Hugging Face models need the `transformers` package: pip install "
                         "transformers (netpress[bench] installs it)") from None
    return transformers


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (without importing it)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config") \
        and hasattr(model.config, "to_dict")


def _model_class(name: str, where: str) -> Any:
    """A ``transformers`` model class by name: only the package's own classes, never an
    arbitrary import."""
    transformers = _transformers()
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelError(f"{where}: {name!r} is not a transformers model class; pass "
                         f"model_class= naming one (e.g. 'AutoModel', 'BertModel')")
    return cls


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"hf:{path}: no such directory; give a local transformers directory "
                         f"(config.json + model.safetensors); netpress never downloads")
    if not (path / "config.json").is_file():
        raise ModelError(f"hf:{path}: no config.json; this is not a transformers model "
                         f"directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
        raise ModelError(f"hf:{path}: no *.safetensors weights (netpress loads safetensors "
                         f"only, never pickled .bin files); convert them with transformers' "
                         f"save_pretrained(safe_serialization=True)")


def from_pretrained(path: str | os.PathLike[str], *, model_class: str | None = None,
                    dtype: torch.dtype = torch.float32, **kwargs: Any) -> nn.Module:
    """Load the local ``transformers`` directory ``path`` (no hub access), in eval mode.

    The class is ``model_class`` (a ``transformers`` class name such as ``'AutoModel'`` or
    ``'LlamaForCausalLM'``), else the first of the config's ``architectures``, else
    ``AutoModel``. Safetensors weights only. A directory written by :func:`save_pretrained`
    in the padded layout comes back as the compact pruned model. ``kwargs`` go to
    ``transformers``' ``from_pretrained``.
    """
    transformers = _transformers()
    root = Path(path)
    _check_dir(root)
    try:
        config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"hf:{root}: cannot read config.json: {exc}") from None
    name = model_class or next(iter(getattr(config, "architectures", None) or []), "AutoModel")
    cls = _model_class(name, f"hf:{root}")
    try:
        model = cls.from_pretrained(root, local_files_only=True, dtype=dtype,
                                    use_safetensors=True, **kwargs)
    except Exception as exc:
        raise ModelError(f"hf:{root}: transformers could not load the model as {name}: "
                         f"{type(exc).__name__}: {exc}") from None
    layout = getattr(model.config, LAYOUT_KEY, None)
    if isinstance(layout, Mapping) and layout.get("layout") == "padded":
        _unpad(model, layout, f"hf:{root}")
    return model.eval()


# -- writing ---------------------------------------------------------------------------------
def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _param(value: Any) -> nn.Parameter:
    assert isinstance(value, nn.Parameter)
    return value


@torch.no_grad()
def _dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every integer/codebook-weight Linear or Conv2d as a float layer;
    ModelError for any other netpress-only module (e.g. activation quantizers)."""
    from netpress.quant.dynamic import DynamicQuantLinear, QuantEmbedding
    from netpress.reconstruct.modules import GroupQuantEmbedding

    floats: dict[int, nn.Parameter] = {}  # id of a code tensor -> the float weight made of it
    for name, m in list(model.named_modules()):
        decode = getattr(m, "dequantized_weight", None) or getattr(m, "decoded_weight", None)
        if not type(m).__module__.startswith("netpress.") or not name:
            continue
        layer: nn.Module
        if isinstance(m, DynamicQuantLinear):
            raise ModelError(
                f"save_pretrained: module {name!r} (DynamicQuantLinear) quantizes its inputs at "
                "run time, which a transformers directory cannot express (written as a float "
                "Linear it would compute something else); write the model before "
                "DynamicQuantize (or with DynamicQuantize(layers=...) limited to the "
                "embeddings), or save the .npress artefact / export ONNX instead")
        codes = getattr(m, "weight_q", None)
        if isinstance(m, (QuantEmbedding, GroupQuantEmbedding)):  # weight-only: exact
            table = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
            if id(codes) in floats:  # a tied table: the same float weight again
                table.weight = floats[id(codes)]
            else:
                table.weight.copy_(m.dequantized_weight())
                floats[id(codes)] = _param(table.weight)
            scale = getattr(m, "scale_by", 1.0)
            if scale != 1.0:  # a scaled word embedding: its transformers class scales again
                table.register_forward_hook(lambda _m, _a, out, c=scale: out * c)
            _replace(model, name, table.to(m.weight_q.device))
            continue
        if callable(decode) and hasattr(m, "in_features") and id(codes) in floats:
            layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            layer.weight = floats[id(codes)]  # the output layer of a tied table
            if m.bias is not None and layer.bias is not None:
                layer.bias.copy_(m.bias.detach().float())
            _replace(model, name, layer.to(layer.weight.device))
            continue
        if callable(decode) and hasattr(m, "in_features"):
            weight = decode().float()
            layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif callable(decode) and hasattr(m, "spec"):
            weight = decode().float()
            spec = {k: v for k, v in m.spec().items() if k not in ("bits", "bias")}
            layer = nn.Conv2d(**spec, bias=m.bias is not None)
        else:
            raise ModelError(
                f"save_pretrained: module {name!r} ({type(m).__name__}) has no transformers "
                f"equivalent (activation quantization cannot be written into a transformers "
                f"directory); save the .npress artefact or export ONNX instead")
        layer.weight.copy_(weight)
        if codes is not None:
            floats[id(codes)] = _param(layer.weight)
        if m.bias is not None and layer.bias is not None:
            layer.bias.copy_(m.bias.detach().float())
        _replace(model, name, layer.to(weight.device))
    return model


def _uniform_sizes(config: Any, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Config fields whose size every layer of the compact ``state`` shares."""
    head_dim = getattr(config, "head_dim", None)
    out: dict[str, int] = {}
    for field, (suffixes, dim, per_head) in _SIZE_RULES.items():
        if not isinstance(getattr(config, field, None), int):
            continue
        sizes = {int(t.shape[dim]) for k, t in state.items() if k.endswith(suffixes)}
        if len(sizes) != 1:
            continue
        (size,) = sizes
        if per_head:
            if not isinstance(head_dim, int) or size % head_dim:
                continue
            size //= head_dim
        out[field] = size
    return out


def _meta_model(model: nn.Module, config: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            built = type(model)(config)
        assert isinstance(built, nn.Module)
        return built
    except Exception:
        return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _padded_state(state: Mapping[str, torch.Tensor], full: Mapping[str, tuple[int, ...]],
                  ) -> dict[str, torch.Tensor]:
    """Every compact tensor zero-padded at the end of each shrunk dim to its full shape."""
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        want = full.get(k)
        if want is None:
            raise ModelError(f"save_pretrained: tensor {k!r} does not exist in the original "
                             f"architecture; only pruning inside the blocks can be written")
        if tuple(t.shape) == want:
            out[k] = t
            continue
        if len(want) != t.dim() or any(a > b for a, b in zip(t.shape, want)):
            raise ModelError(f"save_pretrained: tensor {k!r} has shape {tuple(t.shape)}, "
                             f"which does not fit the original {want}")
        padded = torch.zeros(want, dtype=t.dtype, device=t.device)
        padded[tuple(slice(0, s) for s in t.shape)] = t
        out[k] = padded
    return out


def _unpad(model: nn.Module, layout: Mapping[str, Any], where: str) -> None:
    """Cut a padded directory's zero rows/columns away: the compact pruned model."""
    from netpress.prune.surgery import reshape_template

    shapes = layout.get("shapes")
    attributes = layout.get("attributes") or {}
    if not isinstance(shapes, Mapping) or not isinstance(attributes, Mapping):
        raise ArtefactError(f"{where}: config.json's '{LAYOUT_KEY}' entry is malformed")
    state = model.state_dict()
    compact: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        want = shapes.get(k)
        if want is None:
            compact[k] = t
            continue
        if len(want) != t.dim() or any(int(a) > b for a, b in zip(want, t.shape)):
            raise ArtefactError(f"{where}: compact shape {want} of {k!r} does not fit "
                                f"{tuple(t.shape)}")
        compact[k] = t[tuple(slice(0, int(s)) for s in want)].clone()
    reshape_template(model, {k: tuple(v.shape) for k, v in compact.items()},
                     {str(k): int(v) for k, v in attributes.items()})
    model.load_state_dict(compact, assign=True)
    delattr(model.config, LAYOUT_KEY)


def example_text_inputs(model: nn.Module, batch: int = 2, length: int = 8,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (+ an attention mask with one padded row end) for a text model."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _same_outputs(a: nn.Module, b: nn.Module, x: Inputs) -> float:
    """The largest absolute difference between the primary outputs, relative to a's scale."""
    with torch.no_grad():
        ya = primary_output(call_model(a.eval(), x)).float()
        yb = primary_output(call_model(b.eval(), x)).float()
    if ya.shape != yb.shape:
        return float("inf")
    return float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12))


def _layout(model: nn.Module, work: nn.Module) -> tuple[nn.Module, str]:
    """The ``transformers`` model to write (its config and tensors) and the layout's name."""
    from netpress.prune.surgery import size_attributes

    config = copy.deepcopy(model.config)
    if hasattr(config, LAYOUT_KEY):
        delattr(config, LAYOUT_KEY)
    original = _meta_model(model, config)
    if original is None:
        raise ModelError(f"save_pretrained: transformers cannot rebuild {type(model).__name__} "
                         f"from its config")
    full = _shapes(original)
    state = work.state_dict()
    compact = {k: tuple(v.shape) for k, v in state.items()}
    if compact == full:
        work.config = config
        return work, "dense"
    exact = copy.deepcopy(config)
    for field, value in _uniform_sizes(config, state).items():
        setattr(exact, field, value)
    candidate = _meta_model(model, exact)
    if candidate is not None and _shapes(candidate) == compact:
        work.config = exact
        return work, "exact"
    fresh = size_attributes(original)
    attributes = {k: v for k, v in size_attributes(work).items() if fresh.get(k) != v}
    shapes = {k: list(v) for k, v in compact.items() if v != full.get(k)}
    setattr(config, LAYOUT_KEY, {"layout": "padded", "format": 1, "shapes": shapes,
                                 "attributes": attributes})
    padded = type(model)(config)
    padded.load_state_dict(_padded_state(state, full))
    return padded.eval(), "padded"


def _copy_tokenizer(source: Any, target: Path) -> None:
    src = Path(str(source)) if source else None
    if src is None or not src.is_dir():
        return
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, target / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", target / "1_Pooling")


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], *,
                    example_inputs: Inputs | None = None, tokenizer_from: Any = None,
                    overwrite: bool = False, tolerance: float = 1e-4) -> str:
    """Write ``model`` (a compressed ``transformers`` model) as a ``transformers`` directory.

    Returns the layout: ``"dense"`` (same shapes as the config says), ``"exact"`` (config
    rewritten) or ``"padded"`` (see the module docs). The directory is loaded back with
    ``transformers`` and its outputs compared with ``model``'s on ``example_inputs`` (random
    token ids by default) before it replaces ``path``; ModelError if they differ by more than
    ``tolerance`` (relative to the largest output). Tokenizer files are copied from
    ``tokenizer_from`` (default: the directory the model was loaded from). ``model`` is not
    changed.
    """
    if not is_transformers_model(model):
        raise ModelError(f"save_pretrained needs a transformers model, got "
                         f"{type(model).__name__}; save a .npress artefact instead")
    target = Path(path)
    if target.exists() and not (overwrite and target.is_dir()):
        raise ModelError(f"save_pretrained: '{target}' exists; pass overwrite=True or pick a "
                         f"new directory")
    work = _dequantized(copy.deepcopy(model).cpu().float().eval())
    writable, layout = _layout(model, work)
    x = example_inputs if example_inputs is not None else example_text_inputs(model)
    source = tokenizer_from if tokenizer_from is not None else \
        getattr(model, "name_or_path", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        hf_model: Any = writable
        hf_model.config.architectures = [type(model).__name__]
        hf_model.save_pretrained(tmp)
        _copy_tokenizer(source, tmp)
        loaded = _model_class(type(model).__name__, "save_pretrained").from_pretrained(
            tmp, local_files_only=True, dtype=torch.float32)
        err = _same_outputs(work, loaded, x)
        if not err <= tolerance:
            raise ModelError(
                f"save_pretrained: the {layout} transformers directory does not reproduce the "
                f"model (relative error {err:.3g}); if the hidden size (residual stream) was "
                f"pruned, transformers' config cannot express it: save the .npress artefact")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return layout


# -- the .npress artefact ---------------------------------------------------------------------
def transformers_spec(model: nn.Module) -> dict[str, Any] | None:
    """What an artefact records to rebuild a ``transformers`` model: its class name and
    config (JSON); ``None`` for other models."""
    if not is_transformers_model(model):
        return None
    hf_model: Any = model
    config = hf_model.config.to_dict()
    config.pop(LAYOUT_KEY, None)
    return {"class": type(model).__name__, "config": json.loads(json.dumps(config,
                                                                           default=str))}


def build_from_spec(spec: Mapping[str, Any], where: str) -> nn.Module:
    """A fresh ``transformers`` model (the unpruned template) from :func:`transformers_spec`;
    only ``transformers``' own model classes are accepted."""
    name, config = spec.get("class"), spec.get("config")
    if not isinstance(name, str) or not isinstance(config, dict):
        raise ArtefactError(f"{where}: its transformers architecture record is malformed")
    try:
        cls = _model_class(name, where)
    except ModelError as exc:
        raise ArtefactError(str(exc)) from None
    try:
        cfg = cls.config_class.from_dict(config)
        model = cls(cfg)
    except Exception as exc:
        raise ArtefactError(f"{where}: transformers cannot rebuild {name} from the stored "
                            f"config: {exc}") from None
    assert isinstance(model, nn.Module)
    return model.eval()
