"""Depth pruning: drop whole residual blocks, those whose removal changes the output least.

``DepthPrune(blocks=0.25)`` finds the model's stack of blocks (the longest ``nn.ModuleList``
whose entries share one type, e.g. ``model.layers`` of a Llama, ``encoder.layer`` of a
BERT; or the list named by ``stack=``), and removes a quarter of them. Each candidate is
scored on calibration batches by skipping it (its output replaced by its input, as the
residual stream would carry it) and measuring :func:`output_change`, the relative squared
change of the model's output over the real (unpadded) positions. ``iterative=True``
rescores after every removal (greedy); ``criterion="cosine"`` uses the cheaper one-pass
block-influence score, ``1 - cos(block input, block output)`` per token (ShortGPT).

The blocks are deleted from the list, the ``layer_idx`` attributes and the
``transformers`` config (``num_hidden_layers``, ``layer_types``) follow, so the result is
an ordinary smaller model that saves, loads and writes back as a ``transformers``
directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.data import batches
from netpress.errors import ModelError, RecipeError
from netpress.measure.collect import evaluating, model_device
from netpress.registry import register

__all__ = ["DepthPrune", "find_block_stack", "output_change", "drop_blocks", "block_scores"]


@dataclass(frozen=True, kw_only=True)
class DepthPrune(MethodConfig):
    """Remove ``blocks`` (a fraction of the block stack, rounded to the nearest count) whole
    blocks, ranked on ``calibration_batches`` batches of calibration data.

    ``criterion``: ``output`` (how much skipping the block changes the model's output) or
    ``cosine`` (how little the block changes its own input). ``stack``: the module path of
    the ``nn.ModuleList`` of blocks (default: found automatically). ``keep_first`` /
    ``keep_last``: blocks at either end that are never removed.
    """

    blocks: float = 0.25
    criterion: str = "output"
    iterative: bool = True
    calibration_batches: int = 4
    stack: str | None = None
    keep_first: int = 1
    keep_last: int = 0

    def __post_init__(self) -> None:
        name = self.type_name()
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, (int, float)) \
                or not 0 < self.blocks < 1:
            raise RecipeError(f"{name}: blocks={self.blocks!r} must be a fraction in (0, 1)")
        if self.criterion not in ("output", "cosine"):
            raise RecipeError(f"{name}: criterion={self.criterion!r}; choose 'output' or "
                              f"'cosine'")
        for field_name in ("calibration_batches", "keep_first", "keep_last"):
            v = getattr(self, field_name)
            low = 1 if field_name == "calibration_batches" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RecipeError(f"{name}: {field_name}={v!r} must be an int >= {low}")
        if not isinstance(self.iterative, bool):
            raise RecipeError(f"{name}: iterative must be true or false")


def find_block_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of blocks: ``path`` if given, else the longest list of at least
    two modules of one type (the first such list when lengths tie)."""
    if path is not None:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            stack = None
        if not isinstance(stack, nn.ModuleList):
            raise ModelError(f"DepthPrune: {path!r} is not an nn.ModuleList in "
                             f"{type(model).__name__}")
        return path, stack
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and \
                len({type(b) for b in m}) == 1 and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        raise ModelError(f"DepthPrune: {type(model).__name__} has no stack of repeated blocks "
                         f"(an nn.ModuleList of modules of one type); name it with stack=")
    return best


def _real(inputs: Any, out: torch.Tensor) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if out.dim() >= 3 and isinstance(mask, torch.Tensor) and mask.shape == out.shape[:2]:
        return mask.bool()
    return None


def output_change(reference: torch.Tensor, changed: torch.Tensor,
                  real: torch.Tensor | None = None) -> tuple[float, float]:
    """``(sum of squared differences, sum of squared reference values)`` over real positions:
    their ratio is the relative squared change of an output."""
    if real is not None:
        reference, changed = reference[real], changed[real]
    ref = reference.double()
    return float((changed.double() - ref).pow(2).sum()), float(ref.pow(2).sum())


def _skip_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> Any:
    """A forward hook that makes a block the identity on its hidden states."""
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    raise ModelError(f"DepthPrune: cannot skip a {type(module).__name__} returning "
                     f"{type(output).__name__}")


def _outputs(model: nn.Module, data: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [primary_output(call_model(model, x)).float() for x in data]


def _change_without(model: nn.Module, block: nn.Module, data: list[Any],
                    reference: list[torch.Tensor]) -> float:
    handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
    try:
        outs = _outputs(model, data)
    finally:
        handle.remove()
    num = den = 0.0
    for x, ref, out in zip(data, reference, outs):
        a, b = output_change(ref, out, _real(x, ref))
        num, den = num + a, den + b
    return num / max(den, 1e-30)


def _cosine_scores(model: nn.Module, stack: nn.ModuleList, data: list[Any]) -> list[float]:
    sums = [0.0] * len(stack)
    counts = [0] * len(stack)
    current: list[Any] = [None]

    def hook(i: int) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> None:
            hidden: Any = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
            out = output if isinstance(output, torch.Tensor) else output[0]
            cos = torch.nn.functional.cosine_similarity(hidden.double(), out.double(), dim=-1)
            real = _real(current[0], out)
            cos = cos[real] if real is not None else cos.reshape(-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(stack)]
    try:
        with torch.no_grad():
            for x in data:
                current[0] = x
                call_model(model, x)
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def block_scores(model: nn.Module, stack: nn.ModuleList, data: list[Any],
                 criterion: str = "output") -> list[float]:
    """One score per block of ``stack`` (lower: removing it changes less)."""
    with evaluating(model):
        if criterion == "cosine":
            return _cosine_scores(model, stack, data)
        reference = _outputs(model, data)
        return [_change_without(model, b, data, reference) for b in stack]


def drop_blocks(model: nn.Module, path: str, drop: Iterable[int]) -> list[int]:
    """Delete blocks ``drop`` (indices) from the list at ``path`` in place; renumber
    ``layer_idx`` and update a ``transformers`` config. Returns the kept indices."""
    stack = model.get_submodule(path)
    assert isinstance(stack, nn.ModuleList)
    gone = set(drop)
    kept = [i for i in range(len(stack)) if i not in gone]
    blocks = [stack[i] for i in kept]
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, nn.ModuleList(blocks))
    for new, block in enumerate(blocks):
        for m in block.modules():
            if isinstance(m.__dict__.get("layer_idx"), int):
                m.__dict__["layer_idx"] = new
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = len(blocks)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(stack):
            config.layer_types = [types[i] for i in kept]
    if isinstance(parent.__dict__.get("num_layers"), int):  # e.g. nn.TransformerEncoder
        parent.__dict__["num_layers"] = len(blocks)
    return kept


def _plan_drops(model: nn.Module, cfg: DepthPrune, path: str, data: list[Any],
                count: int) -> tuple[list[int], list[list[float]]]:
    """Original indices of the blocks to drop, and the scores of each round."""
    stack = model.get_submodule(path)
    assert isinstance(stack, nn.ModuleList)
    alive = list(range(len(stack)))
    protected = set(range(cfg.keep_first)) | set(range(len(stack) - cfg.keep_last, len(stack)))
    dropped: list[int] = []
    rounds: list[list[float]] = []
    scores = block_scores(model, stack, data, cfg.criterion)
    while len(dropped) < count:
        rounds.append([round(s, 6) for s in scores])
        order = sorted((s, i) for i, s in zip(alive, scores) if i not in protected)
        if not cfg.iterative:
            dropped = [i for _, i in order[:count]]
            break
        victim = order[0][1]
        dropped.append(victim)
        drop_blocks(model, path, [alive.index(victim)])
        alive.remove(victim)
        if len(dropped) < count:
            stack = model.get_submodule(path)
            assert isinstance(stack, nn.ModuleList)
            scores = block_scores(model, stack, data, cfg.criterion)
    return dropped, rounds


@register(DepthPrune, kind="prune", needs=("calibration",), copy_on_write=True)
def _apply(model: nn.Module, cfg: DepthPrune, ctx: Context) -> nn.Module:
    data_arg = ctx.require("calibration", by=cfg.type_name())
    path, stack = find_block_stack(model, cfg.stack)
    total = len(stack)
    count = int(math.floor(cfg.blocks * total + 0.5))
    removable = total - cfg.keep_first - cfg.keep_last
    if count < 1 or count > removable:
        raise RecipeError(f"{cfg.type_name()}: blocks={cfg.blocks} of {total} blocks in "
                          f"{path!r} removes {count}; between 1 and {removable} can go")
    device = model_device(model)
    data = [move_to(x, device) for i, (x, _) in
            enumerate(batches(data_arg, name="calibration")) if i < cfg.calibration_batches]
    dropped, rounds = _plan_drops(model, cfg, path, data, count)
    if not cfg.iterative:
        drop_blocks(model, path, dropped)
    ctx.record(cfg.type_name(), stack=path, blocks_before=total, dropped=dropped,
               scores=rounds, criterion=cfg.criterion)
    return model
