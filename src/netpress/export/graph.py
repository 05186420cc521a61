"""The forward graph of an artefact, captured with ``torch.fx`` and stored as JSON.

:func:`trace` flattens user container classes into one graph whose leaves are the modules
:mod:`netpress.export.modules` can rebuild. :func:`graph_to_json` turns it into JSON (nodes,
the specs of called modules, the kinds of fetched attributes); :func:`graph_from_json` rebuilds
a ``GraphModule`` from that JSON and the stored tensors. Loading resolves call targets **only**
through :data:`FUNCTIONS` (safe torch / functional / operator / math callables) and
:data:`METHODS` (tensor method names), and checks every name fx will put into the code it
generates, so no text from a file can reach Python code.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from netpress.errors import ArtefactError, ModelError
from netpress.export.modules import build_module, decode_value, encode_value, module_spec

__all__ = [
    "FUNCTIONS",
    "METHODS",
    "GRAPH_VERSION",
    "trace",
    "graph_to_json",
    "graph_tensors",
    "graph_from_json",
    "eval_mode",
]

GRAPH_VERSION = 1

_TORCH = """abs acos add addcdiv addcmul addmm all allclose amax amin any arange argmax argmin
argsort asin atan atan2 baddbmm bmm broadcast_to cat ceil chunk clamp clamp_max clamp_min clip
clone concat concatenate conv1d conv2d conv3d conv_transpose1d conv_transpose2d cos cosh cumprod
cumsum diag diagonal div einsum empty_like eq erf erfc exp expand_copy expm1 eye flatten flip
floor floor_divide fmod full full_like gather ge gelu gt hardtanh hstack index_select isfinite
isinf isnan layer_norm le lerp log log10 log1p log2 log_softmax logical_and logical_not
logical_or logsumexp lt masked_fill matmul max maximum mean min minimum mm movedim mul narrow ne
neg norm numel ones ones_like outer permute pow prod reciprocal relu remainder repeat_interleave
reshape roll round rsqrt select sigmoid sign sin sinh softmax sort split sqrt square squeeze
stack std sub sum t take tanh tensor_split tile topk transpose tril triu true_divide trunc
unbind unflatten unsqueeze var vstack where zeros zeros_like _assert""".split()
_FUNCTIONAL = """adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d avg_pool1d avg_pool2d avg_pool3d batch_norm celu conv1d conv2d conv3d
conv_transpose1d conv_transpose2d cosine_similarity dropout dropout1d dropout2d elu embedding
fold gelu glu group_norm hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm
leaky_relu linear log_softmax logsigmoid max_pool1d max_pool2d max_pool3d mish normalize
one_hot pad pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm scaled_dot_product_attention
selu sigmoid silu softmax softmin softplus softsign tanh tanhshrink unfold""".split()
_OPERATOR = """add sub mul truediv floordiv mod pow matmul neg pos abs invert getitem eq ne lt le
gt ge and_ or_ xor lshift rshift not_ iadd isub imul itruediv""".split()
_MATH = "sqrt floor ceil log exp pow".split()


def _function_table() -> Mapping[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for prefix, namespace, names in (("torch.nn.functional", F, _FUNCTIONAL),
                                     ("torch", torch, _TORCH), ("operator", operator, _OPERATOR),
                                     ("math", math, _MATH)):
        for n in names:
            fn = getattr(namespace, n, None)
            if callable(fn):
                table[f"{prefix}.{n}"] = fn
    table["getattr"] = getattr  # attribute names restricted to _ATTRIBUTES
    return MappingProxyType(table)


FUNCTIONS: Mapping[str, Callable[..., Any]] = _function_table()
"""Every callable a stored graph may call, by the name the artefact uses."""
_NAMES: Mapping[Any, str] = MappingProxyType(
    {fn: name for name, fn in reversed(list(FUNCTIONS.items()))})

METHODS: frozenset[str] = frozenset("""abs add add_ addcmul all amax amin any argmax argmin
argsort bfloat16 bmm bool chunk clamp clamp_ clamp_max clamp_min clip clone contiguous cos cumsum
detach dim div div_ double eq exp expand expand_as flatten flip float floor gather ge gelu gt half
index_select int isnan le log log_softmax long lt masked_fill masked_fill_ matmul max mean min
mul mul_ narrow ne neg new_full new_ones new_zeros norm numel permute pow prod reciprocal relu
relu_ repeat reshape reshape_as roll round rsqrt select sigmoid sigmoid_ sign sin size softmax
split sqrt square squeeze std sub sub_ sum t tanh to topk transpose tril triu type_as unbind
unflatten unsqueeze var view view_as where zero_""".split())
"""Every tensor method name a stored graph may call."""
_ATTRIBUTES = frozenset("shape dtype device ndim T mT is_cuda real imag".split())

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


class _Tracer(fx.Tracer):
    """Leaves are the modules in ``leaves`` (by id); remembers where tracing failed."""

    def __init__(self, leaves: frozenset[int]) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # buffers stay attributes, not folded constants
        self._leaves = leaves
        self._stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaves

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        self._stack.append(f"'{self.path_of_module(m)}' ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def _is_leaf(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks:
        return False  # fx drops a leaf's hooks; traced through, they join the graph
    spec = module_spec(m)
    return spec is not None and spec["type"] not in (
        "torch.nn.Sequential", "torch.nn.ModuleList", "torch.nn.ModuleDict")


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with torch.fx; its allowlisted/registered modules stay leaves.

    The model is traced as it is: Python branches on ``self.training`` follow its current
    mode (netpress's export traces in eval mode). Raises ModelError naming the innermost
    module being traced and the reason when tracing fails.
    """
    # Specs are read before tracing: during it, fx turns parameter reads into graph nodes.
    tracer = _Tracer(frozenset(id(m) for m in model.modules() if _is_leaf(m)))
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = f" in submodule {tracer.failed_in}" if tracer.failed_in else ""
        raise ModelError(f"torch.fx cannot trace {type(model).__name__}{where}: "
                         f"{type(exc).__name__}: {str(exc).strip()}") from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, class_name=name if _IDENT.match(name) else "Traced")
    _keep_non_persistent(model, gm)
    return gm


def _keep_non_persistent(model: nn.Module, gm: fx.GraphModule) -> None:
    """GraphModule copies fetched buffers as persistent ones: restore the model's choice."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, field = str(node.target).rpartition(".")
        try:
            owner, copied = model.get_submodule(owner_path), gm.get_submodule(owner_path)
        except AttributeError:
            continue
        if field in owner._non_persistent_buffers_set and field in copied._buffers:
            copied.register_buffer(field, copied._buffers[field], persistent=False)


# -- saving ------------------------------------------------------------------------------------
def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _attr_kind(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    target = str(node.target)
    value = _fetch(gm, target)
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"node '{node.name}' fetches {target!r}, a {type(value).__name__}; "
                         "only tensor attributes can be stored")
    owner, _, field = target.rpartition(".")
    owner_module = gm.get_submodule(owner)
    if isinstance(value, nn.Parameter):
        return {"kind": "parameter", "requires_grad": bool(value.requires_grad)}
    if field in owner_module._buffers:
        return {"kind": "buffer", "persistent": field not in
                owner_module._non_persistent_buffers_set}
    return {"kind": "constant"}


def _node_target(node: fx.Node) -> str:
    if node.op == "call_function":
        name = _NAMES.get(node.target) if _hashable(node.target) else None
        if name is None:
            raise ModelError(f"node '{node.name}' calls {_qualname(node.target)}, which is not in "
                             "netpress's graph allowlist (netpress.export.graph.FUNCTIONS)")
        if name == "getattr" and (len(node.args) != 2 or node.args[1] not in _ATTRIBUTES):
            raise ModelError(f"node '{node.name}' reads attribute {node.args[1:]!r}; allowed: "
                             f"{', '.join(sorted(_ATTRIBUTES))}")
        return name
    if node.op == "call_method" and node.target not in METHODS:
        raise ModelError(f"node '{node.name}' calls tensor method {node.target!r}, which is not "
                         "in netpress's graph allowlist (netpress.export.graph.METHODS)")
    return str(node.target)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _qualname(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', repr(target))}".lstrip(".")


def _node_ref(v: Any) -> Any:
    return {"node": v.name} if isinstance(v, fx.Node) else None


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON form of ``gm``: nodes, specs of called modules, kinds of fetched attributes.

    Raises ModelError when the graph uses a function, method, module or constant that an
    artefact cannot hold.
    """
    nodes: list[dict[str, Any]] = []
    modules: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for node in gm.graph.nodes:
        target = _node_target(node)
        if node.op == "call_module":
            spec = module_spec(gm.get_submodule(target))
            if spec is None:
                raise ModelError(f"node '{node.name}' calls module '{target}' "
                                 f"({type(gm.get_submodule(target)).__name__}), which netpress "
                                 "cannot rebuild; register it with register_module_type")
            modules[target] = spec
        elif node.op == "get_attr":
            attrs[target] = _attr_kind(gm, node)
        try:
            args = encode_value(list(node.args), _node_ref)
            kwargs = {k: encode_value(v, _node_ref) for k, v in node.kwargs.items()}
        except ModelError as exc:
            raise ModelError(f"node '{node.name}' ({node.op} {target}): {exc}") from None
        nodes.append({"op": node.op, "name": node.name, "target": target,
                      "args": args, "kwargs": kwargs})
    return {"version": GRAPH_VERSION, "nodes": nodes, "modules": modules, "attrs": attrs}


def graph_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph needs by qualified name: called modules' states, fetched attrs."""
    out: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for key, t in gm.get_submodule(str(node.target)).state_dict().items():
                out[f"{node.target}.{key}"] = t
        elif node.op == "get_attr":
            value = _fetch(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                out[str(node.target)] = value.detach()
    return out


# -- loading -----------------------------------------------------------------------------------
@functools.cache
def reserved_names() -> frozenset[str]:
    """Names no stored graph node may take: the generated ``forward`` uses them (``self``,
    ``torch`` and fx's other globals, builtins, Python keywords)."""
    from torch.fx.graph import _custom_builtins

    return frozenset({"self", *keyword.kwlist, *dir(builtins), *_custom_builtins})


@functools.cache
def reserved_arguments() -> frozenset[str]:
    """Names no ``forward`` argument (placeholder) may take. Arguments may shadow builtins the
    generated code never reads (``input`` is common), not ``self``, fx's globals, keywords or
    the builtins the code does read (``getattr`` for paths and allowed attributes, ``slice``
    and ``Ellipsis`` in constants)."""
    from torch.fx.graph import _custom_builtins

    return frozenset({"self", *keyword.kwlist, *_custom_builtins, "getattr", "slice",
                      "Ellipsis", "NotImplemented"})


@functools.cache
def reserved_attributes() -> frozenset[str]:
    """Attribute names of a GraphModule and of ``nn.Module`` (``forward``, ``training``,
    ``_modules``, ``graph``, ``code``, ...): no stored module or tensor may take them."""
    return frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph())))


def _check_name(name: Any, what: str, reserved: frozenset[str] | None = None) -> str:
    """``name`` when it is a plain identifier that shadows nothing the generated code uses."""
    reserved = reserved_names() if reserved is None else reserved
    if not isinstance(name, str) or not _IDENT.match(name) or name in reserved \
            or name.startswith("__"):
        raise ArtefactError(f"{what} {name!r:.80} is invalid: it must be a plain identifier "
                            "that shadows nothing the generated forward uses (self, torch, "
                            "builtins, keywords)")
    return name


def _check_path(path: Any, what: str) -> str:
    parts = path.split(".") if isinstance(path, str) else [""]
    if not all(_PATH_PART.match(p) and not p.startswith("__") and not keyword.iskeyword(p)
               for p in parts):
        raise ArtefactError(f"{what} {path!r:.80} is not a dotted path of identifiers")
    clash = [p for p in parts if p in reserved_attributes()]
    if clash:
        raise ArtefactError(f"{what} {path!r:.80} collides with the nn.Module attribute "
                            f"{clash[0]!r}; no module or tensor may be named like one")
    return str(path)


def _holder(root: nn.Module, parts: list[str]) -> nn.Module:
    """The module at ``parts`` below ``root``, creating empty modules on the way."""
    m = root
    for part in parts:
        child = m._modules.get(part)
        if child is None:
            child = nn.Module()
            m.add_module(part, child)
        m = child
    return m


def _install_module(root: nn.Module, path: str, spec: Any,
                    tensors: Mapping[str, torch.Tensor]) -> None:
    module = build_module(spec)
    prefix = f"{path}."
    wanted = list(module.state_dict())
    missing = [k for k in wanted if prefix + k not in tensors]
    if missing:
        raise ArtefactError(f"module '{path}' needs tensors {missing} that the artefact lacks")
    try:
        module.load_state_dict({k: tensors[prefix + k] for k in wanted}, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtefactError(f"the stored tensors do not fit module '{path}': {exc}") from None
    *parents, field = path.split(".")
    holder = _holder(root, parents)
    if hasattr(holder, field):
        raise ArtefactError(f"module '{path}' collides with an existing attribute")
    holder.add_module(field, module)


def _install_attr(root: nn.Module, target: str, info: Any,
                  tensors: Mapping[str, torch.Tensor]) -> None:
    *parents, field = target.split(".")
    owner = _holder(root, parents)
    if field in owner._parameters or field in owner._buffers:
        return  # part of a rebuilt module's state
    if hasattr(owner, field):
        raise ArtefactError(f"attribute '{target}' collides with an attribute of "
                            f"{type(owner).__name__}")
    if target not in tensors:
        raise ArtefactError(f"attribute '{target}' is fetched by the graph but not stored")
    kind = info.get("kind") if isinstance(info, dict) else None
    t = tensors[target]
    if kind == "parameter":
        grad = bool(info.get("requires_grad", True)) and (t.is_floating_point() or t.is_complex())
        owner.register_parameter(field, nn.Parameter(t, requires_grad=grad))
    elif kind in ("buffer", "constant"):
        owner.register_buffer(field, t, persistent=bool(info.get("persistent", True)))
    else:
        raise ArtefactError(f"attribute '{target}' has unknown kind {kind!r}")


def _resolve_target(op: str, target: Any, name: str) -> Any:
    if op == "call_function":
        if not isinstance(target, str) or target not in FUNCTIONS:
            raise ArtefactError(f"node '{name}' calls {target!r}, which is not in netpress's "
                                "graph allowlist; the artefact was edited or made by a newer "
                                "netpress (upgrade netpress, or load with model=)")
        return FUNCTIONS[target]
    if op == "call_method":
        if target not in METHODS:
            raise ArtefactError(f"node '{name}' calls tensor method {target!r}, which is not in "
                                "netpress's graph allowlist")
        return target
    if op in ("call_module", "get_attr"):
        return _check_path(target, f"node '{name}' target")
    if op == "placeholder":
        if not isinstance(target, str) or not _PLACEHOLDER.match(target):
            raise ArtefactError(f"placeholder '{name}' has invalid argument name {target!r:.80}")
        _check_name(target.lstrip("*"), f"placeholder '{name}' argument name",
                    reserved_arguments())
        return target
    return "output"


def _build_graph(nodes: Any) -> fx.Graph:
    if not isinstance(nodes, list):
        raise ArtefactError("graph 'nodes' is not a list")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def ref(tag: str, body: Any) -> fx.Node:
        if tag != "node" or not isinstance(body, str) or body not in env:
            raise ArtefactError(f"unknown reference {{{tag!r}: {body!r}}} (nodes must come "
                                "after the nodes they use)")
        return env[body]

    for n in nodes:
        if not isinstance(n, dict) or n.get("op") not in _OPS:
            raise ArtefactError(f"malformed graph node {n!r:.120}")
        op = n["op"]
        name = _check_name(n.get("name"), "graph node name")
        if name in env:
            raise ArtefactError(f"graph node name {name!r} is repeated")
        target = _resolve_target(op, n.get("target"), name)
        args = decode_value(n.get("args", []), ref)
        kwargs = n.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and _IDENT.match(k) and not keyword.iskeyword(k)
                for k in kwargs):
            raise ArtefactError(f"node '{name}' has malformed args or kwargs")
        if target is getattr and (len(args) != 2 or args[1] not in _ATTRIBUTES):
            raise ArtefactError(f"node '{name}' reads a disallowed attribute {args[1:]!r}")
        env[name] = graph.create_node(op, target, tuple(args),
                                      {k: decode_value(v, ref) for k, v in kwargs.items()}, name)
    if [n.op for n in graph.nodes].count("output") != 1 or graph.output_node().next.op != "root":
        raise ArtefactError("the graph must end with exactly one output node")
    return graph


def graph_from_json(d: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule :func:`graph_to_json` described, with ``tensors`` by name.

    Raises ArtefactError naming the node, module or target that cannot be rebuilt.
    """
    if not isinstance(d, Mapping) or d.get("version") != GRAPH_VERSION:
        version = d.get("version") if isinstance(d, Mapping) else d
        raise ArtefactError(f"unsupported graph version {version!r} (this netpress reads "
                            f"{GRAPH_VERSION}); upgrade netpress")
    modules, attrs = d.get("modules", {}), d.get("attrs", {})
    if not isinstance(modules, dict) or not isinstance(attrs, dict):
        raise ArtefactError("graph 'modules' and 'attrs' must be JSON objects")
    paths = sorted(_check_path(p, "module path") for p in modules)
    nested = [(a, b) for a, b in zip(paths, paths[1:]) if b.startswith(a + ".")]
    if nested:
        raise ArtefactError(f"module '{nested[0][1]}' is inside module '{nested[0][0]}'; "
                            "stored modules must be leaves")
    root = nn.Module()
    for path, spec in modules.items():
        _install_module(root, path, spec, tensors)
    for target, info in attrs.items():
        _install_attr(root, _check_path(target, "attribute"), info, tensors)
    graph = _build_graph(d.get("nodes"))
    for node in graph.nodes:
        target = str(node.target)
        owner = target.rpartition(".")[0]
        if (node.op == "call_module" and target not in modules) or (
                node.op == "get_attr" and target not in attrs and owner not in modules):
            raise ArtefactError(f"node '{node.name}' uses '{target}', which the graph does not "
                                "declare in its modules/attrs")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name="NetpressGraph")
    except Exception as exc:
        raise ArtefactError(f"the stored graph is inconsistent: {type(exc).__name__}: "
                            f"{str(exc)[:300]}") from None
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not isinstance(_fetch(gm, str(node.target)), torch.Tensor):
            raise ArtefactError(f"node '{node.name}' fetches '{node.target}', which is not a "
                                "tensor")
    return gm.eval()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode for the block, then restore each one."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
