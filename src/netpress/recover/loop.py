"""The one training loop every recovery method uses.

It keeps pruning masks applied after every optimizer step, drives gradual-pruning ramps,
computes the reference (teacher) outputs only when the loss needs them, and refuses to go
on when the loss stops being finite.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, primary_output
from netpress._progress import progress_bar
from netpress.config import MethodConfig
from netpress.context import Context
from netpress.data import batches
from netpress.errors import ModelError, RecipeError
from netpress.recover.distributed import data_parallel, shard
from netpress.recover.early_stop import AgreementMonitor, split_for_monitor
from netpress.recover.losses import real_tokens

__all__ = ["BN_MODES", "TrainConfig", "LossFn", "train", "train_mode"]

#: ``loss(student_out, teacher_out_or_None, labels_or_None) -> scalar``.
LossFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")
BN_MODES = ("train", "frozen")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(MethodConfig):
    """Settings shared by every recovery method (a base class, not a method).

    ``range_reg`` adds ``range_reg_strength`` times an R² range regularizer (``linf``,
    ``margin`` or ``soft_min_max``, see :mod:`netpress.recover.regularizers`) on the
    Conv/Linear weights to the loss, making them friendlier to later quantization.

    Early stopping on agreement (off while ``early_stop_patience`` is None): every
    ``eval_every`` steps (default: once per epoch) the top-1 agreement with the reference is
    measured on held-out data, the best weights are kept, training stops after
    ``early_stop_patience`` checks without improvement, and the best weights are restored
    at the end (pruning masks still applied). ``early_stop_data="held_out"`` holds out every
    ``round(1/validation_fraction)``-th train batch (not trained on); ``"evaluate"`` uses the
    ``evaluate=`` data of the compression instead.

    ``act_sparsity`` (a strength, off while None) adds an L1 penalty on the outputs of
    ``act_layers`` (module names or ``re:`` patterns; default: every ReLU-like module) to make
    activation maps sparse; ``cond_reg`` (a strength) adds a smooth condition-number
    surrogate of the weights of ``cond_layers`` (default: the pruned layers, else every
    Conv/Linear) for robustness. See :func:`netpress.recover.regularizers.training_penalties`.

    ``lr_schedule`` after ``warmup_steps`` of linear warm-up: ``"cosine"`` (default) decays
    to 0 along a half cosine, ``"linear"`` straight to 0 at the last step, ``"constant"``
    keeps ``lr``. ``beta2`` is Adam's / AdamW's second-moment decay: below the default
    0.999, its estimate follows the shrinking gradients of a short run sooner. On
    all-MiniLM-L6-v2 pruned to 50% MACs, 500 distillation steps with ``"linear"`` and
    ``beta2=0.98`` gave embedding cosine 0.9684 against 0.9670 with the defaults
    (BENCHMARKS.md, issue 13, nineteenth part).

    ``bn`` says what BatchNorm layers do during the loop: ``"train"`` normalises with batch
    statistics and re-estimates the running statistics from the recovery batches;
    ``"frozen"`` keeps every BatchNorm module in eval mode, so the running statistics (and
    anything folded into them, such as a structured refit's intercepts) stay exactly as they
    were while the affine weight and bias are still trained.

    ``dropout=False`` trains the model in eval mode (dropout, including attention-probability
    dropout, off; BatchNorm still follows ``bn``): the student then computes exactly what it
    is evaluated with, which matters when distilling towards a reference's outputs.

    Per-token outputs (``[batch, time, ...]``) of dict batches with an ``attention_mask``
    enter the loss only at real tokens: padding never pulls on the weights.

    ``freeze`` (module or parameter names, or ``re:`` patterns matched in full) keeps those
    parameters out of the optimizer and out of the backward pass for the loop (a module
    freezes every parameter under it, e.g. ``("embeddings",)`` for a BERT encoder's input
    embeddings); their ``requires_grad`` is restored afterwards. See :mod:`netpress.recover.freeze`.
    """

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta2: float = 0.999
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    range_reg: str | None = None
    range_reg_strength: float = 1e-3
    early_stop_patience: int | None = None
    eval_every: int | None = None
    early_stop_data: str = "held_out"
    validation_fraction: float = 0.2
    act_sparsity: float | None = None
    act_layers: tuple[str, ...] = ()
    cond_reg: float | None = None
    cond_layers: tuple[str, ...] = ()
    bn: str = "train"
    dropout: bool = True
    freeze: tuple[str, ...] = ()

    def _check_train(self) -> None:
        n = self.type_name()
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise RecipeError(f"{n}: epochs={self.epochs!r} must be > 0")
        if self.max_steps is not None and (not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise RecipeError(f"{n}: max_steps={self.max_steps!r} must be an int >= 1 or null")
        self._check_early_stop()
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"{n}: lr={self.lr!r} must be a positive number")
        if self.optimizer not in OPTIMIZERS:
            raise RecipeError(f"{n}: optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        if isinstance(self.beta2, bool) or not isinstance(self.beta2, (int, float)) \
                or not 0 <= self.beta2 < 1:
            raise RecipeError(f"{n}: beta2={self.beta2!r} must be in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise RecipeError(f"{n}: lr_schedule={self.lr_schedule!r}; choose one of "
                              f"{LR_SCHEDULES}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise RecipeError(f"{n}: warmup_steps must be an int >= 0")
        from netpress.recover.regularizers import REGULARIZERS

        if self.range_reg is not None and self.range_reg not in REGULARIZERS:
            raise RecipeError(f"{n}: range_reg={self.range_reg!r}; choose one of "
                              f"{sorted(REGULARIZERS)} or null")
        if not (isinstance(self.range_reg_strength, (int, float))
                and self.range_reg_strength >= 0):
            raise RecipeError(f"{n}: range_reg_strength must be a number >= 0")
        if self.bn not in BN_MODES:
            raise RecipeError(f"{n}: bn={self.bn!r}; choose one of {BN_MODES}")
        if not isinstance(self.dropout, bool):
            raise RecipeError(f"{n}: dropout={self.dropout!r} must be true or false")
        self._check_penalties()

    def _check_penalties(self) -> None:
        from netpress.select import check_patterns

        n = self.type_name()
        for name in ("act_sparsity", "cond_reg"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value) or value < 0):
                raise RecipeError(f"{n}: {name}={value!r} must be a number >= 0 or null")
        check_patterns(n, act_layers=self.act_layers, cond_layers=self.cond_layers,
                       freeze=self.freeze)

    def _check_early_stop(self) -> None:
        from netpress.recover.early_stop import EARLY_STOP_SOURCES

        n = self.type_name()
        for name in ("early_stop_patience", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise RecipeError(f"{n}: {name}={value!r} must be an int >= 1 or null")
        if self.early_stop_data not in EARLY_STOP_SOURCES:
            raise RecipeError(f"{n}: early_stop_data={self.early_stop_data!r}; choose one of "
                              f"{EARLY_STOP_SOURCES}")
        if not (isinstance(self.validation_fraction, (int, float))
                and 0.0 < self.validation_fraction <= 0.5):
            raise RecipeError(f"{n}: validation_fraction={self.validation_fraction!r} must be "
                              f"in (0, 0.5]")

    def without_early_stop(self) -> dict[str, Any]:
        """This config's :class:`TrainConfig` fields with early stopping switched off."""
        fields = {name: getattr(self, name) for name in TrainConfig.field_names()}
        fields["early_stop_patience"] = None
        return fields


def _steps_per_epoch(data: Any) -> int:
    try:
        return len(data)
    except TypeError:
        return sum(1 for _ in data)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError(f"{cfg.type_name()}: the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2))


def _lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total - cfg.warmup_steps)
        done = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return f


def train(
    model: nn.Module, ctx: Context, cfg: TrainConfig, loss_fn: LossFn, *, needs_teacher: bool
) -> dict[str, Any]:
    """Run ``cfg``'s optimisation of ``model`` on ``ctx.train``; returns a summary."""
    from netpress.recover.freeze import frozen
    from netpress.recover.regularizers import training_penalties

    with frozen(model, cfg.freeze, cfg.type_name()), \
            training_penalties(model, cfg, ctx.masks, loss_fn) as penalised:
        return _train(model, ctx, cfg, penalised, needs_teacher=needs_teacher)


def _train(
    model: nn.Module, ctx: Context, cfg: TrainConfig, loss_fn: LossFn, *, needs_teacher: bool
) -> dict[str, Any]:
    name = cfg.type_name()
    data = ctx.require("train", name)
    patience = cfg.early_stop_patience
    if patience is not None:
        data, watch = split_for_monitor(data, ctx, cfg.early_stop_data, cfg.validation_fraction,
                                        name)
    data = shard(data)  # data-parallel under torchrun: this rank's batches
    if cfg.range_reg is not None:
        from netpress.recover.regularizers import with_range_penalty

        loss_fn = with_range_penalty(loss_fn, model, cfg.range_reg, cfg.range_reg_strength)
    need_epoch = not cfg.max_steps or (patience is not None and cfg.eval_every is None)
    per_epoch = _steps_per_epoch(data) if need_epoch else 0
    total = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * per_epoch)))
    monitor = None
    if patience is not None:
        every = cfg.eval_every or max(1, min(per_epoch, total))
        monitor = AgreementMonitor(ctx, watch, every=every, patience=patience)
        monitor.check(model, 0, eligible=_ramps_done(ctx))
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    ctx.reference.eval()
    train_mode(model, cfg.bn, cfg.dropout)
    runner = data_parallel(model)  # averages gradients over ranks (itself in one process)
    step, running, stop = 0, float("nan"), False
    with progress_bar(total, name, ctx.progress) as advance:
        while step < total and not stop:
            for inputs, labels in batches(data, name=f"{name} train"):
                ctx.before_train_step(model, step, total)
                loss = _loss(runner, ctx, loss_fn, inputs, labels, needs_teacher)
                if not torch.isfinite(loss):
                    raise ModelError(f"{name}: the loss became {loss.item()} at step {step}; "
                                     f"lower lr (now {cfg.lr}) or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                ctx.apply_masks(model)
                value = float(loss.detach())
                running = value if math.isnan(running) else 0.9 * running + 0.1 * value
                step += 1
                advance(loss=running)
                if monitor is not None and monitor.due(step, total):
                    stop = monitor.check(model, step, eligible=_ramps_done(ctx))
                if step >= total or stop:
                    break
    if runner is not model:
        # DDP's reducer goes now, while the process group lives, not whenever a reference
        # cycle is collected (perhaps at the interpreter's exit, after destroy_process_group):
        # a suspect, not proven, for an abort of the 2-process test on a loaded machine
        # ("terminate called without an active exception", twice in many runs)
        del runner
        gc.collect()
    finished = ctx.finish_schedules(model)
    model.eval()
    summary: dict[str, Any] = {"steps": step, "final_loss": round(running, 6)}
    if monitor is not None:
        summary["early_stop"] = {"stopped_early": stop, **monitor.restore(model)}
    if finished:
        summary["ramped"] = finished
    sparsity = ctx.mask_sparsity()
    if sparsity is not None:
        summary["mask_sparsity"] = round(sparsity, 6)
    return summary


def train_mode(model: nn.Module, bn: str = "train", dropout: bool = True) -> None:
    """Put ``model`` in train mode; with ``bn="frozen"`` its BatchNorm modules stay in eval
    mode (running statistics used and left unchanged; affine parameters still trainable).
    With ``dropout=False`` every other module stays in eval mode (no dropout) and only
    BatchNorm trains, when ``bn="train"``."""
    model.train()  # a model's own train() override (e.g. a frozen part) is respected
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    training = [m.training for m in norms]
    if not dropout:
        model.eval()
    for module, was in zip(norms, training):
        module.train(was and bn == "train")


def _ramps_done(ctx: Context) -> bool:
    """Whether every pruning ramp has reached its final sparsity (so weights kept now carry
    the final masks)."""
    return all(s.current >= s.final for s in ctx.schedules)


def _loss(model: nn.Module, ctx: Context, loss_fn: LossFn, inputs: Any, labels: Any,
          needs_teacher: bool) -> torch.Tensor:
    inputs = move_to(inputs, ctx.device)
    labels = labels.to(ctx.device) if isinstance(labels, torch.Tensor) else None
    teacher = None
    if needs_teacher:
        with torch.no_grad():
            teacher = primary_output(call_model(ctx.reference, inputs)).detach()
    student = primary_output(call_model(model, inputs))
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor):
        student, teacher, labels = real_tokens(mask, student, teacher, labels)
    return loss_fn(student, teacher, labels)
