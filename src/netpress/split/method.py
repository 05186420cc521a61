"""``Split``: split computing with a learned, quantized bottleneck (BottleFit's two stages).

The model is cut after module ``at`` (:mod:`netpress.split.cut`); a bottleneck encoder and
decoder (:mod:`netpress.split.bottleneck`) is inserted there, and trained in two stages as in
BottleFit (Matsubara et al., 2022):

1. **head distillation**: the head (unless ``train_head=False``) and the bottleneck learn to
   reproduce the *original* head's output at the cut (mean squared error), with the tail
   untouched;
2. **output distillation**: the parts named in ``stage2_trains`` (by default the decoder and
   the tail, as in BottleFit: the device side is final) are fine-tuned to the original
   model's outputs (soft targets at ``temperature``, plus labels with weight ``1 - alpha``;
   ``alpha=1`` is pure distillation, agreement being the target); the other parts are
   frozen, BatchNorm statistics included. Adding ``"encoder"`` lets the transmitted codes
   themselves adapt to the output loss (``rate`` then applies in stage 2 too).

``rate`` adds an L1 penalty on the codes (the same term as the recoveries'
``act_sparsity``, on the bottleneck's output) that pushes them towards small values, which
the entropy coder then sends in fewer bytes. With ``entropy="factorized"`` the bottleneck
learns a per-channel density of its codes instead (:mod:`netpress.split.entropy`, Ballé et
al.'s factorized prior, as in Matsubara et al.'s Entropic Student) and ``rate`` is the weight
λ of its ``-log2 p`` (bits per input) in the loss of every stage that trains the encoder;
the arithmetic coder then codes with that density, so the trained rate is the sent size.
Both stages run the shared recovery loop, so pruning masks set before the split stay applied.

A stage that trains the head (``train_head`` in stage 1, ``"head"`` in ``stage2_trains``)
normalises its BatchNorm layers with batch statistics by default (``head_bn="train"``);
``head_bn="frozen"`` keeps them in eval mode, so the head's running statistics stay the
original's while its weights (BatchNorm's affine ones included) train, e.g. when stage 2
fine-tunes the device's whole part end to end from the original head.

``cache_head=True`` (head frozen in both stages and still the original's) computes the head's
outputs and the original model's outputs once for the training inputs
(:mod:`netpress.split.cached`) and trains both stages from that cache: stage 1 then costs only
the bottleneck, so it can run for thousands of steps, and stage 2 the bottleneck and the tail.
There the pretrained tail can also train at its own learning rate, ``tail_lr`` (the new
bottleneck keeps ``lr``): Adam at the bottleneck's rate moves a pretrained tail far from what
it computed. ``stage1_rate`` (cached stages only) is stage 1's own rate weight: ``0`` makes
stage 1 a rate-free feature distillation, which can then run long enough to rebuild the
tail's input closely, and leaves the rate to stage 2 against the output loss; a learned
entropy model is first fitted alone to the stage-1 codes
(:func:`~netpress.split.cached.fit_prior`, ``prior_steps``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, primary_output, take_batch
from netpress.config import MethodConfig, check_fraction
from netpress.context import Context
from netpress.data import first_batch
from netpress.errors import ModelError, RecipeError
from netpress.recover.loop import OPTIMIZERS, LossFn, TrainConfig, train
from netpress.recover.losses import distillation_loss, feature_mse
from netpress.recover.regularizers import training_penalties
from netpress.registry import register
from netpress.split.bottleneck import ENTROPY_MODELS, build_bottleneck
from netpress.split.cached import build_cache, fit_cached, fit_prior
from netpress.split.cut import cut_model, resolve_cut
from netpress.split.frozen_head import Back, HeadOutputs, same_module
from netpress.split.model import SplitModel

__all__ = ["Split"]


@dataclass(frozen=True, kw_only=True)
class Split(MethodConfig):
    """Cut the model after module ``at`` and insert a trained, quantized bottleneck.

    ``at``: a module name, or a ``re:`` pattern (the first matching module, in forward order,
    where the model can be cut). ``channels``: channels of the transmitted tensor; ``bits``
    (2..8): bits per transmitted value; ``stride``: spatial downsampling of the encoder for
    image-like maps; ``hidden``: width of the encoder/decoder (default: the cut tensor's
    channels). ``stage1_steps`` / ``stage2_steps``: optimizer steps of the two training stages
    (batches of the ``train`` data; ``stage1_steps=0`` skips stage 1), at ``lr`` with
    ``optimizer`` and a cosine schedule. ``stage2_trains``: the parts stage 2 trains, from
    ``head``, ``encoder``, ``decoder``, ``tail``. ``entropy``: ``"none"`` (``rate`` is an L1
    penalty on the codes) or ``"factorized"`` (a learned density of the codes; ``rate`` is
    the weight of its bits per input in the loss). ``depth``: 3×3 convolutions per resolution
    stage of the encoder and the decoder (a small latent, e.g. ``stride=4``, is reached
    through more layers). ``logit_mse``: weight of the squared error of the logits added to
    stage 2's distillation (:func:`netpress.split.losses.logit_kd_loss`). ``head_bn``:
    ``"train"`` (batch statistics) or ``"frozen"`` (eval mode, running statistics kept) for
    the head's BatchNorm layers in the stages that train the head. ``decoder_hidden`` /
    ``decoder_depth``: the server-side decoder's own width and depth (both ``None``: the
    decoder mirrors the encoder, ``hidden`` and ``depth``; either given: the decoder's
    stride-1 layers become ``decoder_depth - 1`` residual blocks per upsampling stage,
    ``decoder_hidden`` wide, the other setting defaulting to the encoder's); the decoder
    runs on the server, so it costs no bytes and no device MACs.
    """

    at: str = "re:.*"
    channels: int = 8
    bits: int = 8
    stride: int = 2
    hidden: int | None = None
    stage1_steps: int = 200
    stage2_steps: int = 200
    lr: float = 1e-3
    optimizer: str = "adam"
    temperature: float = 4.0
    alpha: float = 0.9
    rate: float = 0.0
    train_head: bool = True
    stage2_trains: tuple[str, ...] = ("decoder", "tail")
    head_bn: str = "train"
    entropy: str = "none"
    cache_head: bool = False
    tail_lr: float | None = None
    stage1_rate: float | None = None
    prior_steps: int = 300
    depth: int = 1
    logit_mse: float = 0.0
    decoder_hidden: int | None = None
    decoder_depth: int | None = None

    def __post_init__(self) -> None:
        n = self.type_name()
        if not isinstance(self.at, str) or not self.at:
            raise RecipeError(f"{n}: at={self.at!r} must name a module or be a 're:' pattern")
        _positive_ints(self, ("channels", "stride", "stage2_steps", "depth"))
        v = self.logit_mse
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise RecipeError(f"{n}: logit_mse={v!r} must be a number >= 0")
        if isinstance(self.stage1_steps, bool) or not isinstance(self.stage1_steps, int) \
                or self.stage1_steps < 0:
            raise RecipeError(f"{n}: stage1_steps={self.stage1_steps!r} must be an int >= 0")
        for name in ("hidden", "decoder_hidden", "decoder_depth"):
            if getattr(self, name) is not None:
                _positive_ints(self, (name,))
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
                or not 2 <= self.bits <= 8:
            raise RecipeError(f"{n}: bits={self.bits!r} must be an int in [2, 8]")
        for name in ("lr", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise RecipeError(f"{n}: {name}={v!r} must be a number > 0")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) \
                or self.rate < 0:
            raise RecipeError(f"{n}: rate={self.rate!r} must be a number >= 0")
        check_fraction(n, "alpha", self.alpha, hi_open=False)
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"{n}: optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        if not isinstance(self.train_head, bool):
            raise RecipeError(f"{n}: train_head must be true or false")
        parts = self.stage2_trains
        if isinstance(parts, str) or not parts or any(p not in PARTS for p in parts):
            raise RecipeError(f"{n}: stage2_trains={parts!r} must list one or more of "
                              f"{tuple(PARTS)}")
        if self.head_bn not in HEAD_BN:
            raise RecipeError(f"{n}: head_bn={self.head_bn!r}; choose one of {HEAD_BN}")
        if self.entropy not in ENTROPY_MODELS:
            raise RecipeError(f"{n}: entropy={self.entropy!r}; choose one of {ENTROPY_MODELS}")
        self._check_cache()
        if self.entropy == "factorized" and not self.rate:
            raise RecipeError(f"{n}: entropy='factorized' learns its density through the rate "
                              f"term; give rate > 0 (the weight of the bits per input, e.g. "
                              f"1e-4)")


    def _check_cache(self) -> None:
        n = self.type_name()
        if not isinstance(self.cache_head, bool):
            raise RecipeError(f"{n}: cache_head must be true or false")
        if self.cache_head and (self.train_head or "head" in self.stage2_trains):
            raise RecipeError(f"{n}: cache_head=True computes the head's outputs once, so the "
                              f"head must stay frozen: set train_head=False and leave 'head' "
                              f"out of stage2_trains")
        if self.tail_lr is not None:
            v = self.tail_lr
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise RecipeError(f"{n}: tail_lr={v!r} must be a number > 0 or null")
            if not self.cache_head:
                raise RecipeError(f"{n}: tail_lr (a learning rate of its own for the tail) "
                                  f"needs cache_head=True, which trains in netpress.split's "
                                  f"own loop")
        if self.stage1_rate is not None:
            v = self.stage1_rate
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RecipeError(f"{n}: stage1_rate={v!r} must be a number >= 0 or null "
                                  f"(null: stage 1 uses rate)")
            if not self.cache_head:
                raise RecipeError(f"{n}: stage1_rate (stage 1's own rate weight) needs "
                                  f"cache_head=True")
        v = self.prior_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise RecipeError(f"{n}: prior_steps={v!r} must be an int >= 0")


#: What the head's BatchNorm layers do in a stage that trains the head.
HEAD_BN = ("train", "frozen")

#: The parts of a split model that ``stage2_trains`` names, and their module names.
PARTS = {"head": "head", "encoder": "bottleneck.encoder", "decoder": "bottleneck.decoder",
         "tail": "tail"}


#: Integer settings of :class:`Split` whose ``None`` means "as the encoder / the cut tensor".
_OPTIONAL_INTS = ("hidden", "decoder_hidden", "decoder_depth")


def _positive_ints(cfg: Split, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RecipeError(f"{cfg.type_name()}: {name}={v!r} must be an int >= 1"
                              + (" or null" if name in _OPTIONAL_INTS else ""))


def _stage_config(cfg: Split, steps: int, rate: float) -> TrainConfig:
    if cfg.entropy != "none":
        rate = 0.0  # the rate is the entropy model's, added by :func:`_with_rate`
    return TrainConfig(max_steps=steps, lr=cfg.lr, optimizer=cfg.optimizer,
                       act_sparsity=rate or None,
                       act_layers=("bottleneck.quant",) if rate else ())


@contextlib.contextmanager
def _freeze(model: SplitModel | nn.Module, parts: list[str],
            frozen_bn: tuple[str, ...] = ()) -> Iterator[None]:
    """No gradients into ``parts`` and BatchNorm statistics kept, for one training stage;
    ``frozen_bn``: parts that train with their BatchNorm layers in eval mode."""
    modules = [model.get_submodule(p) for p in parts]
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    model.frozen = tuple(parts)  # type: ignore[union-attr]
    model.frozen_bn = frozen_bn  # type: ignore[union-attr]
    try:
        yield
    finally:
        model.frozen = ()  # type: ignore[union-attr]
        model.frozen_bn = ()  # type: ignore[union-attr]
        for p, flag in saved:
            p.requires_grad_(flag)


def _with_rate(loss_fn: LossFn, split: SplitModel, weight: float) -> LossFn:
    """``loss_fn`` plus ``weight`` times the bits per input the bottleneck's entropy model
    gave the last training batch (``loss_fn`` itself without an entropy model)."""
    if split.bottleneck.prior is None:
        return loss_fn

    def loss(out: torch.Tensor, ref: torch.Tensor | None,
             labels: torch.Tensor | None) -> torch.Tensor:
        total = loss_fn(out, ref, labels)
        rate = split.bottleneck.take_rate()
        return total if rate is None or not weight else total + weight * rate.to(total)

    return loss


def _head_loss(out: torch.Tensor, ref: torch.Tensor | None,
               _labels: torch.Tensor | None) -> torch.Tensor:
    if ref is None or ref.shape != out.shape:
        raise ModelError(f"Split: the original model's tensor at the cut has shape "
                         f"{None if ref is None else tuple(ref.shape)}, the model's has "
                         f"{tuple(out.shape)}; split before changing the layers at the cut")
    return feature_mse(out, ref)


@register(Split, kind="other", needs=("train",))
def _apply_split(model: nn.Module, cfg: Split, ctx: Context) -> nn.Module:
    if ctx.schedules:
        raise RecipeError("Split: a pruning ramp (schedule='cubic') is still open; add its "
                          "recovery step before Split")
    example = take_batch(first_batch(ctx.require("train", cfg.type_name()), name="train")[0], 2)
    at = resolve_cut(model, cfg.at)
    cut, teacher = cut_model(model, at), cut_model(ctx.reference, at)
    with torch.no_grad():
        shape = tuple(primary_output(call_model(cut.head.eval(), example)).shape)
    bottleneck = build_bottleneck(shape, cfg.channels, cfg.bits, stride=cfg.stride,
                                  hidden=cfg.hidden, entropy=cfg.entropy,
                                  depth=cfg.depth, decoder_hidden=cfg.decoder_hidden,
                                  decoder_depth=cfg.decoder_depth).to(ctx.device)
    split = SplitModel(cut.head, bottleneck, cut.tail, at=at)
    names = {id(p): n for n, p in split.named_parameters()}
    ctx.masks = {names[id(model.get_parameter(k))]: m for k, m in ctx.masks.items()
                 if id(model.get_parameter(k)) in names}
    if cfg.cache_head:
        stage1, stage2 = _cached_stages(split, teacher, cfg, ctx)
    else:
        stage1 = _stage1(split, teacher.head.eval(), cfg, ctx)
        stage2 = _stage2(split, teacher, cfg, ctx)
    split.eval()
    ctx.record(cfg.type_name(), at=at, cut_shape=list(shape[1:]),
               code_shape=_code_shape(split, example), bits=cfg.bits,
               stage1=stage1, stage2=stage2)
    return split


def _shared_head(split: SplitModel, teacher_head: nn.Module, head_trains: bool) -> bool:
    """Whether a stage can run on the head's outputs (:mod:`netpress.split.frozen_head`)."""
    return not head_trains and same_module(split.head, teacher_head)


def _stage1(split: SplitModel, teacher_head: nn.Module, cfg: Split, ctx: Context
            ) -> dict[str, Any]:
    """Head distillation: the head (if trained) and the bottleneck match the original head."""
    if not cfg.stage1_steps:
        return {"steps": 0}
    train_cfg = _stage_config(cfg, cfg.stage1_steps, cfg.rate)
    head_loss = _with_rate(_head_loss, split, cfg.rate)
    if _shared_head(split, teacher_head, cfg.train_head):
        data = HeadOutputs(ctx.require("train", cfg.type_name()), split.head, ctx.device)
        fast = ctx.fork(reference=nn.Identity(), train=data)
        fast.masks = {}
        with _freeze(split, ["head"]):  # keeps the head's BatchNorm statistics as they are
            out = train(split.bottleneck, fast, dataclasses.replace(
                train_cfg, act_layers=("quant",) if train_cfg.act_sparsity else ()), head_loss,
                needs_teacher=True)
        return {**out, "shared_head": True}
    front = split.front()
    head_ctx = ctx.fork(reference=teacher_head)
    head_ctx.masks = {k: m for k, m in ctx.masks.items() if k.startswith("head.")}
    with _freeze(front, [] if cfg.train_head else ["head"], _head_bn(cfg, cfg.train_head)):
        return train(front, head_ctx, train_cfg, head_loss, needs_teacher=True)


def _head_bn(cfg: Split, head_trains: bool) -> tuple[str, ...]:
    """The parts whose BatchNorm stays in eval mode in a stage that trains them."""
    return ("head",) if head_trains and cfg.head_bn == "frozen" else ()


def _kd_loss(cfg: Split) -> LossFn:
    """Stage 2's loss: distillation of the original model's outputs (and the labels)."""

    def kd_loss(out: torch.Tensor, ref: torch.Tensor | None,
                labels: torch.Tensor | None) -> torch.Tensor:
        assert ref is not None
        loss = distillation_loss(out, ref, labels, cfg.temperature, cfg.alpha)
        return loss + cfg.logit_mse * feature_mse(out, ref) if cfg.logit_mse else loss

    return kd_loss


def _stage2(split: SplitModel, teacher: Any, cfg: Split, ctx: Context) -> dict[str, Any]:
    """Output distillation of the parts ``cfg.stage2_trains`` names."""
    frozen = [m for p, m in PARTS.items() if p not in cfg.stage2_trains]
    encoder_trains = "encoder" in cfg.stage2_trains
    if split.bottleneck.prior is not None and not encoder_trains:
        frozen.append("bottleneck.prior")  # the codes stay, so their density stays too
    output_loss = _with_rate(_kd_loss(cfg), split, cfg.rate if encoder_trains else 0.0)
    train_cfg = _stage_config(cfg, cfg.stage2_steps, cfg.rate if encoder_trains else 0.0)
    if _shared_head(split, teacher.head, "head" in cfg.stage2_trains):
        back = Back(split.bottleneck, split.tail)
        data = HeadOutputs(ctx.require("train", cfg.type_name()), split.head, ctx.device)
        fast = ctx.fork(reference=teacher.tail.eval(), train=data)
        fast.masks = {k: m for k, m in ctx.masks.items() if not k.startswith("head.")}
        with _freeze(back, [m for m in frozen if m != "head"]):
            out = train(back, fast, train_cfg, output_loss, needs_teacher=True)
        ctx.masks.update(fast.masks)
        return {**out, "shared_head": True}
    with _freeze(split, frozen, _head_bn(cfg, "head" in cfg.stage2_trains)):
        return train(split, ctx, train_cfg, output_loss, needs_teacher=True)


def _code_shape(split: SplitModel, example: Any) -> list[int]:
    with torch.no_grad():
        codes = split.device_part().eval()(example)
    return list(codes.shape[1:])


def _stage1_params(bottleneck: nn.Module, rate: float) -> list[nn.Parameter]:
    """Stage 1's parameters: without a rate term, not the entropy model's (no gradient)."""
    prior = getattr(bottleneck, "prior", None)
    skip = set() if rate or prior is None else {id(p) for p in prior.parameters()}
    return [p for p in bottleneck.parameters() if id(p) not in skip]


def _cached_stages(split: SplitModel, teacher: Any, cfg: Split, ctx: Context
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both stages from one pass of the head and the teacher (:mod:`netpress.split.cached`)."""
    if not same_module(split.head, teacher.head):
        raise ModelError("Split(cache_head=True): the head is no longer the original model's "
                         "(a step before Split changed it), so the original's outputs cannot "
                         "be computed from the head's; use cache_head=False")
    cache = build_cache(ctx.require("train", cfg.type_name()), split.head, teacher.tail,
                        ctx.device)
    masks = {k: m for k, m in ctx.masks.items() if not k.startswith("head.")}
    fork = ctx.fork()
    fork.masks = masks
    stage1: dict[str, Any] = {"steps": 0}
    rate1 = cfg.rate if cfg.stage1_rate is None else cfg.stage1_rate
    if cfg.stage1_steps:
        train_cfg = _stage_config(cfg, cfg.stage1_steps, rate1)
        train_cfg = dataclasses.replace(
            train_cfg, act_layers=("quant",) if train_cfg.act_sparsity else ())
        with training_penalties(split.bottleneck, train_cfg, {},
                                _with_rate(_head_loss, split, rate1)) as loss:
            stage1 = fit_cached(split.bottleneck, cache, loss, "head", steps=cfg.stage1_steps,
                                groups=[(_stage1_params(split.bottleneck, rate1), cfg.lr)],
                                optimizer=cfg.optimizer)
    if split.bottleneck.prior is not None and not rate1 and cfg.prior_steps:
        stage1["prior_fit"] = fit_prior(split.bottleneck, cache, steps=cfg.prior_steps,
                                        lr=cfg.lr)
    back = Back(split.bottleneck, split.tail)
    frozen = [m for p, m in PARTS.items() if p not in cfg.stage2_trains and p != "head"]
    encoder_trains = "encoder" in cfg.stage2_trains
    if split.bottleneck.prior is not None and not encoder_trains:
        frozen.append("bottleneck.prior")
    rate = cfg.rate if encoder_trains else 0.0
    train_cfg = _stage_config(cfg, cfg.stage2_steps, rate)
    with _freeze(back, frozen), training_penalties(
            back, train_cfg, masks, _with_rate(_kd_loss(cfg), split, rate)) as loss:
        stage2 = fit_cached(back, cache, loss, "output", steps=cfg.stage2_steps,
                            groups=[(list(split.bottleneck.parameters()), cfg.lr),
                                    (list(split.tail.parameters()), cfg.tail_lr or cfg.lr)],
                            optimizer=cfg.optimizer, after_step=fork.apply_masks, seed=1)
    return stage1, {**stage2, "tail_lr": cfg.tail_lr or cfg.lr}
