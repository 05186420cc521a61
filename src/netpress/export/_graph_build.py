"""Rebuilding a stored graph: every name checked, every target from the allowlists.

The names a file gives nodes, arguments, modules and attributes end up in the Python source
fx generates for ``forward``. :func:`graph_from_json` therefore accepts only plain
identifiers that shadow nothing that code uses (``self``, ``torch`` and fx's other globals,
builtins, keywords: :func:`reserved_names`), module and attribute paths whose parts are not
attributes of ``nn.Module``/``GraphModule`` (:func:`reserved_attributes`), modules that are
leaves, and tensors for every fetched attribute. Call targets resolve only through
:mod:`._allowlist`.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from netpress.errors import ArtefactError
from netpress.export._allowlist import ATTRIBUTES, FUNCTIONS, GRAPH_VERSION, METHODS, OPS
from netpress.export.modules import build_module, decode_value

__all__ = ["graph_from_json", "reserved_names", "reserved_arguments", "reserved_attributes",
           "fetch", "IDENT"]

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH_PART = re.compile(r"[A-Za-z0-9_]+\Z")


def fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
    if not isinstance(name, str) or not IDENT.match(name) or name in reserved \
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
        if not isinstance(n, dict) or n.get("op") not in OPS:
            raise ArtefactError(f"malformed graph node {n!r:.120}")
        op = n["op"]
        name = _check_name(n.get("name"), "graph node name")
        if name in env:
            raise ArtefactError(f"graph node name {name!r} is repeated")
        target = _resolve_target(op, n.get("target"), name)
        args = decode_value(n.get("args", []), ref)
        kwargs = n.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and IDENT.match(k) and not keyword.iskeyword(k)
                for k in kwargs):
            raise ArtefactError(f"node '{name}' has malformed args or kwargs")
        if target is getattr and (len(args) != 2 or args[1] not in ATTRIBUTES):
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
        if node.op == "get_attr" and not isinstance(fetch(gm, str(node.target)), torch.Tensor):
            raise ArtefactError(f"node '{node.name}' fetches '{node.target}', which is not a "
                                "tensor")
    return gm.eval()
