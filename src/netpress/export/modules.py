"""Leaf module specs: rebuild standard ``torch.nn`` modules from JSON, without user code.

A spec is ``{"type": "torch.nn.Conv2d", "kwargs": {...}}``. Types resolve only through an
explicit allowlist of ``torch.nn`` classes and the :func:`register_module_type` registry (for
netpress's own layers); nothing is ever imported by name. For allowlisted classes the kwargs are
read generically: each ``__init__`` argument is taken from the attribute of the same name
(``bias`` from ``m.bias is not None``); ``device``/``dtype`` and ``_private`` arguments are
skipped (tensors carry their dtype). Every spec is **verified** when made: the module rebuilt
from it (on the meta device) must have the same ``repr`` and ``state_dict`` shapes as the
original, or the module is reported unsupported (``None``).

Kwarg values are encoded with :func:`encode_value`, a small tagged JSON form that keeps tuples,
slices, dtypes, non-finite floats, ... distinct (``{"tuple": [3, 3]}``), so specs rebuild
exactly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from netpress.errors import ArtefactError, ModelError

__all__ = [
    "Spec",
    "ALLOWED_MODULES",
    "register_module_type",
    "module_spec",
    "build_module",
    "allowed_kwargs",
    "MAX_INIT_BYTES",
    "leaf_specs",
    "apply_specs",
    "encode_value",
    "decode_value",
]

Spec = dict[str, Any]
ToSpec = Callable[[nn.Module], "dict[str, Any] | None"]
FromSpec = Callable[..., nn.Module]

_ALLOWED_NAMES = (
    "Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d Linear Bilinear "
    "Embedding EmbeddingBag BatchNorm1d BatchNorm2d BatchNorm3d LayerNorm GroupNorm RMSNorm "
    "InstanceNorm1d InstanceNorm2d InstanceNorm3d LocalResponseNorm "
    "Dropout Dropout1d Dropout2d Dropout3d AlphaDropout "
    "ReLU ReLU6 LeakyReLU PReLU RReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardswish "
    "Hardsigmoid Hardtanh Hardshrink Softshrink Tanhshrink Softsign LogSigmoid Threshold GLU "
    "Softmax Softmax2d LogSoftmax Softmin Softplus Identity Flatten Unflatten "
    "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d "
    "AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d "
    "Upsample UpsamplingNearest2d UpsamplingBilinear2d PixelShuffle PixelUnshuffle ChannelShuffle "
    "ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d ConstantPad3d ReflectionPad1d "
    "ReflectionPad2d ReplicationPad1d ReplicationPad2d CosineSimilarity PairwiseDistance "
    "Sequential ModuleList ModuleDict"
).split()
ALLOWED_MODULES: Mapping[str, type[nn.Module]] = MappingProxyType({
    f"torch.nn.{n}": getattr(nn, n)
    for n in _ALLOWED_NAMES if isinstance(getattr(nn, n, None), type)
})
"""The ``torch.nn`` classes whose specs are read generically, by their spec type name."""
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class _Registered:
    name: str
    cls: type[nn.Module]
    to_spec: ToSpec
    from_spec: FromSpec


# The deliberate module-level registry (a plugin table): filled at import, extended only by
# register_module_type.
_REGISTRY: dict[str, _Registered] = {}
_BY_CLASS: dict[type[nn.Module], _Registered] = {}


def register_module_type(cls: type[nn.Module], to_spec: ToSpec, from_spec: FromSpec, *,
                         name: str | None = None) -> None:
    """Let artefacts hold modules of type ``cls`` (exact type; subclasses are not covered).

    ``to_spec(m)`` returns the kwargs (values :func:`encode_value` accepts) or ``None`` when
    ``m`` cannot be described; ``from_spec(**kwargs)`` builds an equivalent module whose
    ``state_dict`` then receives the stored tensors. ``name`` defaults to the class's
    qualified name; it is only a lookup key, never imported.
    """
    key = name or f"{cls.__module__}.{cls.__qualname__}"
    if key in ALLOWED_MODULES or (key in _REGISTRY and _REGISTRY[key].cls is not cls):
        raise ValueError(f"module type name {key!r} is already taken")
    entry = _Registered(key, cls, to_spec, from_spec)
    _REGISTRY[key] = entry
    _BY_CLASS[cls] = entry


# -- value encoding ----------------------------------------------------------------------------
_DTYPE_TABLE = MappingProxyType({str(v).removeprefix("torch."): v for v in vars(torch).values()
                                 if isinstance(v, torch.dtype)})
_FORMATS = MappingProxyType({n: getattr(torch, n) for n in (
    "contiguous_format", "channels_last", "channels_last_3d", "preserve_format")})
_LAYOUTS = MappingProxyType({"strided": torch.strided, "sparse_coo": torch.sparse_coo})
_FLOATS = MappingProxyType({"inf": math.inf, "-inf": -math.inf, "nan": math.nan})


def _encode_float(v: float) -> Any:
    if math.isfinite(v):
        return v
    return {"float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def _encode_torch(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    return None


def encode_value(v: Any, ref: Callable[[Any], Any] | None = None) -> Any:
    """``v`` as tagged JSON; ``ref(v)`` encodes anything else (or returns None: unsupported).

    Raises ModelError for a value it cannot encode.
    """
    def enc(x: Any) -> Any:
        return encode_value(x, ref)

    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return _encode_float(v)
    if isinstance(v, torch.Size):
        return {"size": [int(d) for d in v]}
    if isinstance(v, tuple):
        return {"tuple": [enc(x) for x in v]}
    if isinstance(v, list):
        return [enc(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: enc(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [enc(v.start), enc(v.stop), enc(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": None}
    tagged = _encode_torch(v) if ref is None else (_encode_torch(v) or ref(v))
    if tagged is None:
        raise ModelError(f"cannot store a value of type {type(v).__name__} ({v!r:.80})")
    return tagged


def _lookup(table: Mapping[str, Any], key: Any, what: str) -> Any:
    if not isinstance(key, str) or key not in table:
        raise ArtefactError(f"unknown {what} {key!r}")
    return table[key]


def decode_value(j: Any, ref: Callable[[str, Any], Any] | None = None) -> Any:
    """Invert :func:`encode_value`; ``ref(tag, payload)`` decodes tags it does not know."""
    def dec(x: Any) -> Any:
        return decode_value(x, ref)

    if j is None or isinstance(j, (bool, int, float, str)):
        return j
    if isinstance(j, list):
        return [dec(x) for x in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ArtefactError(f"malformed value {j!r:.80}: expected a one-key tagged object")
    (tag, body), = j.items()
    if tag in ("tuple", "size", "slice") and not isinstance(body, list):
        raise ArtefactError(f"malformed {tag} value {body!r:.80}")
    if tag == "tuple":
        return tuple(dec(x) for x in body)
    if tag == "size":
        if not all(type(d) is int for d in body):
            raise ArtefactError(f"malformed size value {body!r:.80}: sizes are integers")
        return torch.Size(body)
    if tag == "slice":
        if len(body) != 3:
            raise ArtefactError(f"malformed slice value {body!r:.80}: expected 3 items")
        return slice(*(dec(x) for x in body))
    if tag == "dict" and isinstance(body, dict):
        return {str(k): dec(x) for k, x in body.items()}
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return _lookup(_FLOATS, body, "float")
    if tag == "dtype":
        return _lookup(_DTYPE_TABLE, body, "dtype")
    if tag == "memory_format":
        return _lookup(_FORMATS, body, "memory format")
    if tag == "layout":
        return _lookup(_LAYOUTS, body, "layout")
    if tag == "device" and isinstance(body, str):
        try:
            return torch.device(body)
        except RuntimeError as exc:
            raise ArtefactError(f"bad device {body!r}: {exc}") from None
    if ref is not None:
        return ref(tag, body)
    raise ArtefactError(f"unknown value tag {tag!r}")


# -- specs -------------------------------------------------------------------------------------
def _generic_kwargs(m: nn.Module) -> dict[str, Any] | None:
    """Constructor kwargs read from same-named attributes; None when one is missing."""
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(type(m).__init__).parameters.values():
        if p.name in ("self", "device", "dtype") or p.name.startswith("_"):
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "bias" and not isinstance(getattr(m, "bias", None), (bool, int, float)):
            kwargs["bias"] = getattr(m, "bias", None) is not None
        elif hasattr(m, p.name):
            kwargs[p.name] = getattr(m, p.name)
        elif p.default is p.empty:
            return None
    return kwargs


def _mha_kwargs(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, nn.MultiheadAttention)
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
            "batch_first": m.batch_first}


register_module_type(nn.MultiheadAttention, _mha_kwargs, nn.MultiheadAttention,
                     name="torch.nn.MultiheadAttention")


def _type_name(cls: type[nn.Module]) -> str | None:
    entry = _BY_CLASS.get(cls)
    if entry is not None:
        return entry.name
    name = f"torch.nn.{cls.__name__}"
    return name if ALLOWED_MODULES.get(name) is cls else None


def _fingerprint(m: nn.Module, shallow: bool) -> tuple[Any, ...]:
    if shallow:
        own = [(k, None if v is None else tuple(v.shape))
               for k, v in [*m._parameters.items(), *m._buffers.items()]]
        return type(m), own
    return type(m), repr(m), [(k, tuple(v.shape)) for k, v in m.state_dict().items()]


def module_spec(m: nn.Module) -> Spec | None:
    """The verified spec of ``m``, or None when its type or arguments are not supported.

    Containers (Sequential, ModuleList, ModuleDict) get a spec of the empty container; their
    children are described separately.
    """
    type_name = _type_name(type(m))
    if type_name is None:
        return None
    entry = _REGISTRY.get(type_name)
    try:
        raw = entry.to_spec(m) if entry else ({} if isinstance(m, _CONTAINERS)
                                              else _generic_kwargs(m))
        if raw is None:
            return None
        spec: Spec = {"type": type_name,
                      "kwargs": {str(k): encode_value(v) for k, v in raw.items()}}
        shallow = isinstance(m, _CONTAINERS)
        if _fingerprint(build_module(spec), shallow) != _fingerprint(m, shallow):
            return None
    except (ModelError, ArtefactError):
        return None
    return spec


def allowed_kwargs(factory: FromSpec, *, registered: bool = False) -> frozenset[str] | None:
    """The keyword arguments a spec may pass to ``factory``: its named parameters except
    ``device``, ``dtype`` and ``_private`` ones. ``None`` (any such name) only for a
    registered ``from_spec`` that takes ``**kwargs``; containers take none."""
    if factory in _CONTAINERS:
        return frozenset()
    params = list(inspect.signature(factory).parameters.values())
    if registered and any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in ("self", "device", "dtype") and not p.name.startswith("_"))


def _check_kwargs(type_name: str, factory: FromSpec, kwargs: Mapping[str, Any],
                  registered: bool) -> None:
    allowed = allowed_kwargs(factory, registered=registered)
    bad = sorted(k for k in kwargs if (k in ("device", "dtype") or k.startswith("_")
                                       or (allowed is not None and k not in allowed)))
    if bad:
        raise ArtefactError(f"module spec {type_name} passes kwargs {bad[:5]}, which are not "
                            f"among its allowed arguments {sorted(allowed or ())}")


MAX_INIT_BYTES = 64 << 20
"""The most a module that must be built on the CPU (one with non-persistent buffers, which
only ``__init__`` fills) may allocate before its stored tensors replace its parameters."""


def build_module(spec: Mapping[str, Any], *, device: str | None = None) -> nn.Module:
    """Build the module ``spec`` describes, on ``device``; ArtefactError when it cannot.

    Only the constructor's own arguments pass (never ``device``, ``dtype`` or private ones).
    Without ``device`` the module is built on the meta device (no memory, no init cost); one
    with non-persistent buffers, which only ``__init__`` can fill, is then built again on the
    CPU if that takes at most :data:`MAX_INIT_BYTES`. The caller assigns the stored tensors
    (``load_state_dict(..., assign=True)``).
    """
    type_name = spec.get("type") if isinstance(spec, Mapping) else None
    raw_kwargs = spec.get("kwargs", {}) if isinstance(spec, Mapping) else None
    if not isinstance(type_name, str) or not isinstance(raw_kwargs, dict):
        raise ArtefactError(f"malformed module spec {spec!r:.120}")
    entry = _REGISTRY.get(type_name)
    factory: FromSpec | None = entry.from_spec if entry else ALLOWED_MODULES.get(type_name)
    if factory is None:
        raise ArtefactError(f"module type {type_name!r:.80} is not one netpress can rebuild "
                            "(not an allowlisted torch.nn class nor a registered type); "
                            "pass model= with an instance of the original architecture")
    kwargs = {str(k): decode_value(v) for k, v in raw_kwargs.items()}
    _check_kwargs(type_name, factory, kwargs, entry is not None)
    try:
        if device is not None:
            return _construct(factory, kwargs, device)
        module = _construct(factory, kwargs, "meta")
    except MemoryError:
        raise
    except Exception as exc:  # a constructor rejecting its kwargs raises anything
        raise ArtefactError(f"cannot build {type_name} from kwargs {raw_kwargs!r:.200}: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if not _has_unsaved_buffers(module):
        return module
    need = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if need > MAX_INIT_BYTES:
        raise ArtefactError(f"{type_name} has non-persistent buffers, so it must be built on "
                            f"the CPU, and would allocate {need} bytes there (limit "
                            f"{MAX_INIT_BYTES}); its kwargs {raw_kwargs!r:.120} are implausible")
    try:
        return _construct(factory, kwargs, "cpu")
    except MemoryError:
        raise
    except Exception as exc:
        raise ArtefactError(f"cannot build {type_name} on the CPU: {type(exc).__name__}: "
                            f"{str(exc)[:200]}") from None


def _construct(factory: FromSpec, kwargs: dict[str, Any], device: str) -> nn.Module:
    with torch.device(device):
        module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the factory returned a {type(module).__name__}, not an nn.Module")
    return module


def _has_unsaved_buffers(module: nn.Module) -> bool:
    saved = set(module.state_dict())
    return any(name not in saved for name, _ in module.named_buffers())


def leaf_specs(model: nn.Module) -> dict[str, Spec]:
    """Specs of every non-container module of ``model`` that has one, by qualified name."""
    specs: dict[str, Spec] = {}
    for path, m in model.named_modules():
        if path and not isinstance(m, _CONTAINERS):
            spec = module_spec(m)
            if spec is not None:
                specs[path] = spec
    return specs


def _find(root: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module] | None:
    """``(parent, field, module)`` for the submodule at ``path``, or None."""
    *parents, field = path.split(".")
    parent = root
    for part in parents:
        child = parent._modules.get(part)
        if child is None:
            return None
        parent = child
    module = parent._modules.get(field)
    return None if module is None else (parent, field, module)


def apply_specs(model: nn.Module, specs: Mapping[str, Any], *, strict: bool = True) -> list[str]:
    """Rebuild, in place, every module of ``model`` whose spec differs from ``specs[path]``.

    This is how a template model takes the recorded architecture (e.g. a Conv2d whose
    out_channels shrank). Rebuilt modules are on the meta device until tensors are assigned.
    Returns the replaced paths; a path ``model`` lacks is an ArtefactError when ``strict``.
    """
    replaced = []
    for path, spec in specs.items():
        found = _find(model, str(path))
        if found is None:
            if strict:
                kind = spec.get("type") if isinstance(spec, Mapping) else spec
                raise ArtefactError(f"the template {type(model).__name__} has no module "
                                    f"'{path}' ({kind}); pass an instance of the architecture "
                                    "the artefact was saved from")
            continue
        parent, field, current = found
        if module_spec(current) != spec:
            parent.add_module(field, build_module(spec))
            replaced.append(str(path))
    return replaced
