"""Cut a model into a head and a tail at the output of a named module (``torch.fx``).

The model is traced with the module at the cut as a leaf. The head is every node the cut
module's output depends on; the tail is the rest, reading the cut tensor from a new
placeholder. The cut is refused, with the reason, when anything else crosses it: a skip
connection from before the cut, the raw input used again after it, a shape read from it.
Parameters and buffers fetched on both sides are simply shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from netpress.errors import ModelError, SelectionError
from netpress.select import select_names

__all__ = ["Cut", "cut_model", "resolve_cut"]


@dataclass
class Cut:
    """A model cut in two: ``tail(head(x))`` computes the model."""

    at: str
    head: fx.GraphModule
    tail: fx.GraphModule


class _CutTracer(fx.Tracer):
    def __init__(self, at: str) -> None:
        super().__init__()
        self.at = at

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.at or super().is_leaf_module(
            m, module_qualified_name)


def _trace(model: nn.Module, at: str) -> fx.Graph:
    try:
        return _CutTracer(at).trace(model)
    except Exception as exc:
        raise ModelError(f"Split: torch.fx cannot trace {type(model).__name__} to cut it at "
                         f"{at!r}: {type(exc).__name__}: {exc}") from exc


def _order(model: nn.Module) -> list[str]:
    """Module names in the order their forward runs (first call), on the traced graph."""
    try:
        graph = fx.Tracer().trace(model)
    except Exception:
        return [n for n, _ in model.named_modules() if n]
    seen: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            parts = str(node.target).split(".")
            for k in range(1, len(parts) + 1):
                name = ".".join(parts[:k])
                if name not in seen:
                    seen.append(name)
    return seen


def resolve_cut(model: nn.Module, at: str) -> str:
    """The module name a ``Split(at=...)`` means: the name itself, or for a ``re:``
    pattern the first matching module (in forward order) at which the model can be cut."""
    names = [n for n, _ in model.named_modules() if n]
    if not at.startswith("re:"):
        if at not in names:
            raise SelectionError(f"Split: the model has no module {at!r}; name one of its "
                                 f"modules (e.g. {names[:6]})")
        return at
    matched = set(select_names(names, [at], (), owner="Split", what="module"))
    reasons = []
    for name in [n for n in _order(model) if n in matched]:
        try:
            cut_model(model, name)
            return name
        except ModelError as exc:
            reasons.append(str(exc))
    raise ModelError(f"Split: no module matching {at!r} is a place the model can be cut: "
                     + "; ".join(reasons[:3]))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _find(graph: fx.Graph, at: str) -> fx.Node:
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == at]
    if len(calls) != 1:
        why = "is never called" if not calls else f"is called {len(calls)} times"
        raise ModelError(f"Split: module {at!r} {why} in the forward pass; cut at a module "
                         f"that runs exactly once")
    return calls[0]


def cut_model(model: nn.Module, at: str) -> Cut:
    """Cut ``model`` at the output of module ``at`` (an exact name); see the module doc."""
    graph = _trace(model, at)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(f"Split: {type(model).__name__} takes {len(inputs)} inputs; split "
                         f"computing supports models with one tensor input")
    cut = _find(graph, at)
    head_nodes = _ancestors(cut)
    for node in graph.nodes:
        if node in head_nodes or node.op == "output":
            continue
        for src in node.all_input_nodes:
            if src in head_nodes and src is not cut and src.op != "get_attr":
                what = "the model input" if src.op == "placeholder" else f"'{src.name}'"
                raise ModelError(f"Split: cannot cut at {at!r}: {what} from before the cut is "
                                 f"also used after it (by '{node.name}'), so more than one "
                                 f"tensor would cross; cut at a module whose output is the "
                                 f"only thing the rest of the model reads")
    head = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node in head_nodes:
            env[node] = head.node_copy(node, lambda n: env[n])
    head.output(env[cut])
    tail = fx.Graph()
    tenv: dict[fx.Node, Any] = {cut: tail.placeholder("x")}
    for node in graph.nodes:
        if node is cut or (node in head_nodes and node.op != "get_attr"):
            continue
        if node in head_nodes and not any(u not in head_nodes for u in node.users):
            continue  # a parameter only the head reads
        tenv[node] = tail.node_copy(node, lambda n: tenv[n])
    head_gm, tail_gm = fx.GraphModule(model, head, "Head"), fx.GraphModule(model, tail, "Tail")
    return Cut(at=at, head=head_gm, tail=tail_gm)
