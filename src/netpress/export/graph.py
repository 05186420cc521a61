"""The forward graph of an artefact, captured with ``torch.fx`` and stored as JSON.

:func:`trace` flattens user container classes into one graph whose leaves are the modules
:mod:`netpress.export.modules` can rebuild. :func:`graph_to_json` turns it into JSON (nodes,
the specs of called modules, the kinds of fetched attributes); :func:`graph_from_json` rebuilds
a ``GraphModule`` from that JSON and the stored tensors (:mod:`._graph_build`). Loading resolves
call targets **only** through :data:`FUNCTIONS` (safe torch / functional / operator / math
callables) and :data:`METHODS` (tensor method names) (:mod:`._allowlist`), and checks every
name fx will put into the code it generates, so no text from a file can reach Python code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from netpress.errors import ModelError
from netpress.export._allowlist import ATTRIBUTES, FUNCTIONS, GRAPH_VERSION, METHODS, function_name
from netpress.export._graph_build import IDENT, fetch, graph_from_json
from netpress.export.modules import encode_value, module_spec

__all__ = [
    "FUNCTIONS",
    "ATTRIBUTES",
    "METHODS",
    "GRAPH_VERSION",
    "trace",
    "graph_to_json",
    "graph_tensors",
    "graph_from_json",
    "eval_mode",
]

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
    gm = fx.GraphModule(tracer.root, graph, class_name=name if IDENT.match(name) else "Traced")
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
def _attr_kind(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    target = str(node.target)
    value = fetch(gm, target)
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
        name = function_name(node.target)
        if name is None:
            raise ModelError(f"node '{node.name}' calls {_qualname(node.target)}, which is not in "
                             "netpress's graph allowlist (netpress.export.graph.FUNCTIONS)")
        if name == "getattr" and (len(node.args) != 2 or node.args[1] not in ATTRIBUTES):
            raise ModelError(f"node '{node.name}' reads attribute {node.args[1:]!r}; allowed: "
                             f"{', '.join(sorted(ATTRIBUTES))}")
        return name
    if node.op == "call_method" and node.target not in METHODS:
        raise ModelError(f"node '{node.name}' calls tensor method {node.target!r}, which is not "
                         "in netpress's graph allowlist (netpress.export.graph.METHODS)")
    return str(node.target)


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
            value = fetch(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                out[str(node.target)] = value.detach()
    return out


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
