"""Toy models, toy data and the method contract, for netpress's tests and for yours.

Every method, built-in or registered by a user, must pass :func:`check_method_contract`:
its config round-trips through JSON and YAML, it applies to the toy models, the input model
is left untouched (bit for bit, and the result shares none of its tensors), the result
saves and loads back bit for bit, and a seed makes it deterministic.
"""

from __future__ import annotations

import copy
import hashlib
import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "text_lines",
    "weight_sparsity",
    "varied_teacher",
    "TinyMLP",
    "TinyCNN",
    "TinyResNet",
    "toy_batches",
    "toy_models",
    "toy_transformer",
    "state_equal",
    "state_digest",
    "check_method_contract",
    "hidden_weights",
    "prune_zeroed_units",
    "token_ids",
    "onnx_errors_at_shapes",
]


class TinyMLP(nn.Module):
    """Flatten → Linear → ReLU → Linear, for N×1×8×8 inputs."""

    def __init__(self, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class TinyCNN(nn.Module):
    """Conv → BN → ReLU → Conv → pool → Linear, for N×1×8×8 inputs."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyResNet(nn.Module):
    """A residual block with an option-A style channel-padding shortcut."""

    def __init__(self, width: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.conv_a = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(2 * width)
        self.conv_b = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.head = nn.Linear(2 * width, classes)
        self.pad = width // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        y = self.conv_b(F.relu(self.bn_a(self.conv_a(x))))
        y = F.relu(y + short)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TinyBlock(nn.Module):
    """A pre-norm transformer block: multi-head self-attention and a GELU MLP."""

    def __init__(self, dim: int = 16, heads: int = 4, ffn: int = 32) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a = F.scaled_dot_product_attention(self._heads(self.q(h)), self._heads(self.k(h)),
                                           self._heads(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(x.size(0), x.size(1), -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """N×1×8×8 inputs read as 8 tokens of 8 features, three :class:`TinyBlock`, mean pool."""

    def __init__(self, dim: int = 16, blocks: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1, 2))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def toy_transformer(classes: int = 4) -> TinyTransformer:
    """A deterministically initialised :class:`TinyTransformer` (for transformer-only methods)."""
    torch.manual_seed(3)
    return TinyTransformer(classes=classes).eval()


def toy_models(classes: int = 4) -> dict[str, nn.Module]:
    """One of each toy model, deterministically initialised."""
    out = {}
    for i, cls in enumerate((TinyMLP, TinyCNN, TinyResNet)):
        torch.manual_seed(i)
        out[cls.__name__] = cls(classes=classes).eval()
    return out


def toy_batches(n: int = 64, batch: int = 16, classes: int = 4, seed: int = 0,
                model: nn.Module | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """N×1×8×8 inputs in batches; labels from ``model`` if given (a learnable task), else random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if model is not None:
        was_training = model.training
        with torch.no_grad():
            y = model.eval()(x).argmax(1)
        model.train(was_training)
    else:
        y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
          "pi rho sigma tau upsilon phi chi psi omega").split()


def text_lines(n: int) -> list[str]:
    """``n`` deterministic texts of 3 to 13 words (for text data in tests: varied lengths,
    so batches are padded)."""
    return [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(3 + i % 11))
            for i in range(n)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all Conv2d/Linear weights of ``model``."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def varied_teacher(seed: int = 0) -> TinyMLP:
    """A TinyMLP whose predictions vary across classes (random CNNs with BatchNorm tend to
    predict one class, which makes agreement trivially high): a teacher for recovery tests."""
    torch.manual_seed(seed)
    model = TinyMLP(hidden=64)
    with torch.no_grad():
        model.fc2.weight.mul_(5)
    return model


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    """True if both state dicts have the same keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict: names, dtypes, shapes and the raw bytes of every
    tensor (-0.0 and NaN payloads included, which ``torch.equal`` does not tell apart)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hidden_weights(model: nn.Module) -> list[str]:
    """Modules whose ``weight`` is a tensor that is neither an ``nn.Parameter`` nor the
    decoded value of a coded layer: :func:`netpress.measure.size.parameter_count` and the
    report's storage rows would leave such weights out."""
    from netpress.measure.size import is_coded

    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter) \
                and not is_coded(module):
            out.append(f"{name or '<model>'} ({type(module).__name__})")
    return out


def check_method_contract(config: Any, model: nn.Module, data: list[Any], seed: int = 0,
                          before: tuple[Any, ...] = ()) -> dict[str, Any]:
    """Assert the method contract for ``config`` on ``model``; returns the compress result.

    ``before`` holds steps the method needs ahead of it in a recipe (e.g. a compression step
    for L-C). Raises ``AssertionError`` describing the first broken clause.
    """
    import netpress as npr
    from netpress.config import Recipe

    recipe = Recipe((*before, config))
    assert Recipe.from_json(recipe.to_json()) == recipe, "config does not round-trip via JSON"
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe, "config does not round-trip via YAML"
    original, digest = copy.deepcopy(model), state_digest(model)
    kwargs = dict(train=data, calibration=data, evaluate=data, example_inputs=data[0][0][:1],
                  seed=seed, measure=False)
    first = npr.compress(model, recipe, **kwargs)
    assert state_equal(model, original), "the input model was modified"
    assert state_digest(model) == digest, "the input model's bytes were modified"
    theirs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()} - {0}
    assert not any(t.untyped_storage().data_ptr() in theirs
                   for t in first.model.state_dict().values()), \
        "the compressed model shares a tensor with the input model"
    hidden = hidden_weights(first.model)
    assert not hidden, ("weights the size accounting cannot see (neither an nn.Parameter nor "
                        f"a coded layer with dequantized_weight()/decoded_weight()): {hidden[:5]}")
    second = npr.compress(model, recipe, **kwargs)
    assert state_equal(first.model, second.model), "not deterministic under a fixed seed"
    buf = io.BytesIO()
    from netpress.export import dumps_artefact, load_artefact

    buf.write(dumps_artefact(first.model, recipe=recipe.to_dict()))
    loaded = load_artefact(buf.getvalue()).model
    x = data[0][0]
    with torch.inference_mode():
        assert torch.equal(loaded(x), first.model(x)), "save/load does not reproduce outputs"
    return {"result": first, "loaded": loaded}


def prune_zeroed_units(model: nn.Module, x: Any, share: float = 0.4,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The structured-pruning exactness check, on ``model`` in place.

    Zero every coupled slice of a random ``share`` of each exact channel group's units, then
    remove those units physically. Returns the outputs ``(before, after)`` on ``x``: they must
    match within float tolerance, since only zeros were removed. Inexact groups (the hidden
    size, whose norms' statistics count every channel) and groups whose sizes the model's
    code cannot follow (as structured pruning would leave them) are not cut.
    """
    import numpy as np

    from netpress._inputs import call_model, primary_output
    from netpress.graph import analyze
    from netpress.prune.surgery import PruneCheckError, plan_sizes, remove_units, verify_pruned

    model.eval()
    graph = analyze(model, x)
    groups = [g for g in graph.groups if g.exact]
    if not groups:
        raise AssertionError("the model has no exact prunable channel group")
    rng = np.random.default_rng(seed)
    chosen = {}
    for i, g in enumerate(groups):
        k = min(len(g) - 1, max(1, int(share * len(g))))
        keep = -(-(len(g) - k) // 8) * 8  # a multiple of 8 channels, as some kernels need
        keep = keep - 8 if keep >= len(g) else keep
        if g.width == 1 and keep >= 8:
            k = len(g) - keep
        if k > 0:
            chosen[i] = rng.choice(g.units, size=k, replace=False)
    while True:
        pruned = np.zeros(graph.blocked.size, dtype=bool)
        for units in chosen.values():
            pruned[units] = True
        try:
            sizes = plan_sizes(graph, pruned)
            break
        except PruneCheckError as exc:
            bad = {i for i, units in chosen.items() if np.isin(units, exc.labels).any()}
            if not bad:
                raise
            chosen = {i: u for i, u in chosen.items() if i not in bad}
    with torch.no_grad():
        for key in graph.param_spaces():
            removed = graph.removed(key, pruned)
            if removed.any():
                idx = torch.from_numpy(np.nonzero(removed)[0])
                graph.param(key[0]).index_fill_(key[1], idx, 0.0)
        before = primary_output(call_model(model, x)).clone()
    remove_units(model, graph, pruned, sizes)
    verify_pruned(model, graph, pruned, x)
    with torch.no_grad():
        after = primary_output(call_model(model, x))
    return before, after


def token_ids(batch: int, seq: int, seed: int, vocab: int = 128) -> dict[str, torch.Tensor]:
    """``{"input_ids": ...}``: seeded random token ids of shape ``(batch, seq)``."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}


def onnx_errors_at_shapes(model: nn.Module, path: Any,
                          shapes: tuple[tuple[int, int], ...] = ((1, 12), (3, 7), (2, 20)),
                          vocab: int = 128) -> list[float]:
    """Export a token-id model at batch 1 / 12 tokens and run it in ONNX Runtime at each
    ``(batch, seq)`` of ``shapes``; the relative errors ``||ort - torch|| / ||torch||`` of
    its primary output (shapes asserted equal)."""
    from netpress._inputs import primary_output
    from netpress.export.onnx import OrtModule, export_onnx

    export_onnx(model, path, token_ids(1, 12, 0, vocab))
    ort = OrtModule(path)
    errors = []
    for batch, seq in shapes:
        x = token_ids(batch, seq, batch * 100 + seq, vocab)
        with torch.no_grad():
            ref = primary_output(model(**x))
        out = ort(**x)
        assert out.shape == ref.shape
        errors.append(float((out - ref).norm() / ref.norm()))
    return errors
