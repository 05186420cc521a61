"""Split computing, stage 2 by function matching: teacher and student see the same augmented view.

Beyer et al. (2022), "Knowledge distillation: A good teacher is patient and consistent": the
student is trained to match the teacher's output on *the same* aggressively augmented view
of each image (random crop, flip, and mixup/cutmix between images of the batch), the target
on a mixed image being the teacher's own output on it ("function matching"), for long.

Here the student is the split ResNet-56 of ``split_small.py`` (head frozen at the original's
weights -> encoder -> fixed-grid ``--bits``-bit codes -> decoder -> tail) and the teacher the
original model. Because the head is the frozen original, both share ``h = head(view)``; the
augmented views cannot come from the head-output cache, so ``--views crop`` / ``fm`` run the
head and the original tail live on each augmented batch (no grad, eval mode) and train
bottleneck + tail on it (:class:`LiveViews`); ``--views cached`` is the existing recipe (no
augmentation, cached head outputs).

The 50,000 JPEG train images' head-output cache of ``split_curve.prepare`` (one shuffled
pass) is split: its first ``--held-out`` images are kept out of training and score the
screens (agreement with the original); the rest train. Stage 1 (feature MSE, bottleneck only,
cached) is run once and saved in ``--work``; every stage-2 run starts from it (or from
``--resume``). With ``--eval test`` the run is also scored on the 10,000 JPEG test images
(agreement, arithmetic-coded bytes, decode-back check) and the lossless ones
(``split_small._measure``). ``--coder context`` sends the codes with the context-model coder
(:mod:`netpress.split.context`, fitted on 20,000 train images' codes, ``--context`` the
neighbours) instead of the per-channel one, in every bytes figure. ``--decoder-hidden`` /
``--decoder-depth`` give the server-side decoder a width and depth of its own (residual
blocks, ``build_bottleneck``); the stage-1 state's file name then records them.

With ``--train-head`` (live views only) stage 2 trains the device's head too: the student
is a :class:`~netpress.split.SplitModel` of a copy of the original head, the bottleneck and
the tail, run end to end on each augmented view (:class:`LiveViews` with ``pixels=True``),
the head at ``--head-lr``, its BatchNorm layers in eval mode (``--head-bn eval``: frozen
statistics, the weights still train) or train mode; the target is still the original model's
output on that view. Every score is then recomputed through the trained head
(:func:`rehead`): held-out, train, test and lossless images' head outputs, and the codes the
arithmetic coder is fitted on and sends.

    python benchmarks/split_fm.py --data ../shared/data --views fm --stage2 1000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import data_dir, write_json
from _split_coder import coded_bytes, fit_coder, fit_count
from recovery import crop_flip
from split_curve import _codes, _outputs, common_options, prepare
from split_small import _measure, fit_stage1, fit_stage2, latent_options, stage2_loss

from netpress import datasets as ds
from netpress.split import SplitModel
from netpress.split.bottleneck import Bottleneck, build_bottleneck
from netpress.split.cached import HeadCache, fit_cached

RESULTS = Path(__file__).parent / "results" / "split_fm"
VIEWS = ("cached", "hmix", "plain", "crop", "fm")
LIVE = ("plain", "crop", "fm")


def mix_views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mixup or cutmix (each half of the calls) of a batch with a permutation of itself, one
    ratio ``λ ~ U(0, 1)`` per batch: mixup ``λ x + (1 - λ) x[perm]``; cutmix pastes a box of
    ``x[perm]`` covering ``1 - λ`` of the area (clipped at the border) into ``x``."""
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=gen)
    lam = float(torch.rand((), generator=gen))
    if float(torch.rand((), generator=gen)) < 0.5:
        return lam * x + (1.0 - lam) * x[perm]
    side = (1.0 - lam) ** 0.5
    bh, bw = round(h * side), round(w * side)
    cy, cx = (int(torch.randint(0, d, (), generator=gen)) for d in (h, w))
    y0, y1 = max(0, cy - bh // 2), min(h, cy + (bh + 1) // 2)
    x0, x1 = max(0, cx - bw // 2), min(w, cx + (bw + 1) // 2)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return out


class LiveViews(HeadCache):
    """Batches of ``(head(view), teacher_tail(head(view)), labels)`` for ``fit_cached``: each
    step draws a batch of ``images``, augments it (random crop from the 4-pixel zero-padded
    image + flip; with ``mix``, then mixup/cutmix) and runs the frozen head and the original
    tail on that same view (no grad, eval mode); ``augment = False``: the images as they are.
    With ``pixels`` the batch's first element is the view itself (a student that runs its
    own, trainable head), the target unchanged."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                 teacher_tail: nn.Module, batch: int, mix: bool, pixels: bool = False,
                 augment: bool = True) -> None:
        super().__init__(torch.empty(0), torch.empty(0), labels, batch)
        self.images, self.head, self.teacher_tail, self.mix = images, head, teacher_tail, mix
        self.pixels, self.augment = pixels, augment

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self), generator=generator)
        self.head.eval()
        self.teacher_tail.eval()
        for i in range(0, len(self) - self.batch + 1, self.batch):
            idx = order[i:i + self.batch]
            view = crop_flip(self.images[idx], generator) if self.augment else self.images[idx]
            if self.mix:
                view = mix_views(view, generator)
            with torch.no_grad():  # left before the yield: the caller's step needs grad
                h = self.head(view)
                target = self.teacher_tail(h)
            yield (view if self.pixels else h), target, torch.empty(0)


class MixedCache(HeadCache):
    """Function matching at the cut, on cached head outputs: each batch of ``cache`` mixed
    by :func:`mix_views` (mixup/cutmix of the 16×16 maps, no pixel augmentation) and its
    target recomputed as the original tail's output on the mixed maps (no grad, eval mode);
    costs the teacher tail's forward pass per step, not the head's."""

    def __init__(self, cache: HeadCache, teacher_tail: nn.Module) -> None:
        super().__init__(cache.h, cache.logits, cache.labels, cache.batch)
        self.teacher_tail = teacher_tail

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        self.teacher_tail.eval()
        for h, _, labels in super().batches(generator):
            mixed = mix_views(h, generator)
            with torch.no_grad():
                target = self.teacher_tail(mixed)
            yield mixed, target, labels


def rehead(head: nn.Module, images: torch.Tensor, cache: HeadCache) -> HeadCache:
    """``cache`` with its head outputs recomputed by ``head`` (eval mode, no grad) on
    ``images`` (the same images in the same order; float32): the original model's outputs
    and the labels are kept."""
    head.eval()
    with torch.no_grad():
        h = torch.cat([head(images[i:i + 250]) for i in range(0, len(images), 250)])
    return HeadCache(h, cache.logits, cache.labels, cache.batch)


def fit_stage2_head(split: SplitModel, data: HeadCache, args: argparse.Namespace, steps: int,
                    after_step: Any = None) -> dict[str, Any]:
    """``steps`` of stage 2 end to end on pixel batches (``LiveViews(pixels=True)``): head at
    ``--head-lr``, bottleneck at ``--lr``, tail at ``--tail-lr``, Adam, one cosine cycle;
    ``split_small.stage2_loss``. ``--head-bn eval`` keeps the head's BatchNorm layers in eval
    mode while everything trains (``SplitModel.frozen_bn``, as ``Split(head_bn="frozen")``)."""
    split.frozen_bn = ("head",) if args.head_bn == "eval" else ()
    try:
        return fit_cached(split, data, stage2_loss(args), "output", steps=steps,
                          groups=[(list(split.head.parameters()), args.head_lr),
                                  (list(split.bottleneck.parameters()), args.lr),
                                  (list(split.tail.parameters()), args.tail_lr)],
                          optimizer="adam", after_step=after_step, seed=1)
    finally:
        split.frozen_bn = ()


def _agreement(b: nn.Module, tail: nn.Module, cache: HeadCache) -> float:
    return float((_outputs(b, tail, cache.h).argmax(1) == cache.logits.argmax(1))
                 .float().mean())


def _held_bytes(b: Bottleneck, train: HeadCache, held: HeadCache,
                args: argparse.Namespace) -> float:
    """Mean coded bytes of the held-out images' codes (``--coder``'s model fitted on the
    codes of the first train images, as ``split_small._measure`` does for the test images)."""
    model = fit_coder(_codes(b, train.h[:fit_count(args)].float()), args)
    return float(coded_bytes(_codes(b, held.h.float()), model).mean())


def _decoder_tag(args: argparse.Namespace) -> str:
    """The stage-1 file's suffix for a server-side decoder of its own ('' for the default)."""
    if args.decoder_hidden is None and args.decoder_depth is None:
        return ""
    return f"_dh{args.decoder_hidden or args.hidden}_dd{args.decoder_depth or args.depth}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_options(p)
    latent_options(p, channels=4, stride=2, depth=2, stage1=800, stage2=1000)
    p.add_argument("--views", choices=VIEWS, default="fm",
                   help="cached: no augmentation (the existing recipe); hmix: cached, "
                        "mixup/cutmix of the head outputs, teacher tail on them; plain: live, "
                        "no augmentation (for --train-head); crop: live random "
                        "crop + flip; fm: crop + flip + mixup/cutmix (function matching)")
    p.add_argument("--held-out", type=int, default=2000)
    p.add_argument("--eval", choices=("held", "test"), default="held")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out agreement every N stage-2 steps (a curve; 0: none)")
    p.add_argument("--resume", type=Path, default=None,
                   help="a saved stage-2 state (with --stage2 0: scored, not trained)")
    p.add_argument("--train-head", action="store_true",
                   help="stage 2 trains the head too, end to end on live views "
                        "(plain, crop or fm)")
    p.add_argument("--head-lr", type=float, default=1e-4)
    p.add_argument("--head-bn", choices=("eval", "train"), default="eval",
                   help="the trained head's BatchNorm: frozen statistics, or batch statistics")
    p.add_argument("--decoder-hidden", type=int, default=None,
                   help="the server-side decoder's width (default: --hidden); with it or "
                        "--decoder-depth the decoder's stride-1 layers are residual blocks")
    p.add_argument("--decoder-depth", type=int, default=None,
                   help="the decoder's transposed conv + DEPTH - 1 residual blocks "
                        "(default: --depth)")
    p.add_argument("--work", type=Path, default=Path("/tmp/netpress-split-fm"),
                   help="the 50k head-output cache, stage-1 and stage-2 states")
    p.add_argument("--out", type=Path, default=RESULTS / "fm.json")
    args = p.parse_args(argv)
    args.train_images = 50000
    if args.train_head and args.views not in LIVE:
        p.error("--train-head needs live views: --views plain, crop or fm")
    cpu0 = time.process_time()
    ref, cut, jpeg, (cache, test, exact), _, t_cache = prepare(args)
    # the images in the cache's order (the same seeded shuffle), checked against the cache
    images = ds.cifar10_jpeg_train(data_dir(args.data), limit=50000)
    index = torch.utils.data.TensorDataset(torch.arange(len(images)))
    order = torch.cat([i for (i,) in ds.loader(index, 64, shuffle=True)])
    x, y = images.tensors[0][order], images.tensors[1][order]
    with torch.no_grad():
        drift = float((cut.head.eval()(x[:8]) - cache.h[:8].float()).abs().max())
    if drift > 0.05:
        raise RuntimeError(f"the images do not follow the cache's order (max diff {drift})")
    k = args.held_out
    held = HeadCache(cache.h[:k], cache.logits[:k], None, 250)
    train = HeadCache(cache.h[k:], cache.logits[k:], None, 64)
    print(f"cache {t_cache:.0f} s; train {len(train)}, held out {len(held)}", flush=True)

    torch.manual_seed(0)
    b = build_bottleneck(tuple(train.h[:2].shape), args.channels, args.bits,
                         stride=args.stride, hidden=args.hidden, depth=args.depth,
                         decoder_hidden=args.decoder_hidden, decoder_depth=args.decoder_depth)
    row_decoder = {"decoder_params": sum(p.numel() for p in b.decoder.parameters()),
                   "encoder_params": sum(p.numel() for p in b.encoder.parameters())}
    tail = copy.deepcopy(cut.tail)
    head = copy.deepcopy(cut.head)  # trained only with --train-head
    s1_path = args.work / (f"stage1_{args.at}_c{args.channels}_s{args.stride}_d{args.depth}_"
                           f"b{args.bits}_{args.stage1}_held{k}{_decoder_tag(args)}.pt")
    rows: list[dict[str, Any]] = []
    head_trained = args.train_head  # or loaded from --resume: scores go through rehead()
    if args.resume is not None:
        state = torch.load(args.resume)
        b.load_state_dict(state["bottleneck"])
        tail.load_state_dict(state["tail"])
        if "head" in state:
            head.load_state_dict(state["head"])
            head_trained = True
    elif s1_path.exists():
        b.load_state_dict(torch.load(s1_path))
        rows.append({"after": "stage 1 (loaded)", "steps": args.stage1,
                     "agreement_held": _agreement(b, cut.tail, held),
                     "bytes_held": _held_bytes(b, train, held, args)})
        print(rows[-1], flush=True)
    else:
        t1, c1 = time.perf_counter(), time.process_time()
        s1 = fit_stage1(b, train, args)
        torch.save(b.state_dict(), s1_path)
        rows.append({"after": "stage 1", "steps": args.stage1, **s1,
                     "seconds": round(time.perf_counter() - t1),
                     "cpu_seconds": round(time.process_time() - c1),
                     "agreement_held": _agreement(b, cut.tail, held),
                     "bytes_held": _held_bytes(b, train, held, args)})
        print(rows[-1], flush=True)
    first = HeadCache(train.h[:2000], train.logits[:2000], None, 250)

    def held_now() -> HeadCache:  # the held-out images through the student's head
        return rehead(head, x[:k], held) if head_trained else held

    if args.stage2:
        data: HeadCache = train
        if args.views == "hmix":
            data = MixedCache(train, cut.tail)
        elif args.views in LIVE:
            data = LiveViews(x[k:], y[k:], cut.head, cut.tail, 64, mix=args.views == "fm",
                             pixels=args.train_head, augment=args.views != "plain")
        curve: list[tuple[int, float]] = []
        after_fn = None
        if args.eval_every:
            step = [0]

            def after(module: nn.Module) -> None:
                step[0] += 1
                if step[0] % args.eval_every == 0:
                    curve.append((step[0], _agreement(b, tail, held_now())))
                    print(f"step {step[0]}: held-out agreement {curve[-1][1]:.4f}", flush=True)
                    module.train()

            after_fn = after
        start: dict[str, Any] = {}
        if args.train_head:
            start["agreement_held_start"] = _agreement(b, tail, held_now())
            print(start, flush=True)
        t2, c2 = time.perf_counter(), time.process_time()
        if args.train_head:
            split = SplitModel(head, b, tail, at=args.at)
            s2 = fit_stage2_head(split, data, args, args.stage2, after_step=after_fn)
        else:
            s2 = fit_stage2(b, tail, data, args, args.stage2, after_step=after_fn)
        sec, cpu = time.perf_counter() - t2, time.process_time() - c2
        rows.append({"after": "stage 2", "views": args.views, "train_head": args.train_head,
                     "steps": args.stage2, **s2, **start,
                     "seconds": round(sec), "cpu_seconds": round(cpu),
                     "cpu_s_per_step": round(cpu / max(1, args.stage2), 3),
                     "held_curve": curve})
        saved = {"bottleneck": b.state_dict(), "tail": tail.state_dict()}
        if head_trained:
            saved["head"] = head.state_dict()
        torch.save(saved, args.work / f"{args.out.stem}.pt")
    elif args.resume is not None:
        rows.append({"after": "resumed state, scored", "resumed_from": str(args.resume)})
    if args.stage2 or args.resume is not None:
        row = rows[-1]
        fit_cache = train  # the coder's model is fitted on the first train images' codes
        if head_trained:
            first = rehead(head, x[k:k + 2000], first)
            n_fit = fit_count(args)
            fit_cache = first if n_fit <= 2000 else rehead(
                head, x[k:k + n_fit], HeadCache(train.h[:n_fit], train.logits[:n_fit], None, 250))
            test = rehead(head, ds.cifar10_jpeg_test(data_dir(args.data),
                                                     limit=args.test_images).tensors[0], test)
            exact = rehead(head, ds.cifar10_exact_test(data_dir(args.data)).tensors[0], exact)
            row["head_max_weight_change"] = max(
                float((p1 - p0).detach().abs().max()) for p1, p0 in
                zip(head.parameters(), cut.head.parameters(), strict=True))
            row["head_max_bn_stat_change"] = max(  # running means and variances
                float((b1 - b0).abs().max()) for (n, b1), b0 in
                zip(head.named_buffers(), cut.head.buffers(), strict=True)
                if not n.endswith("num_batches_tracked"))
        held_s = held_now()
        row.update(agreement_held=_agreement(b, tail, held_s),
                   bytes_held=_held_bytes(b, fit_cache, held_s, args),
                   agreement_train_2000=_agreement(b, tail, first))
        if args.eval == "test":
            row.update(_measure(b, tail, fit_cache, test, exact, jpeg, args))
        print(row, flush=True)
    payload = {"model": "resnet56 (akamaster)", **{k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()},
               **row_decoder,
               "jpeg_mean_bytes": float(jpeg.mean()), "cache_seconds": round(t_cache),
               "process_cpu_seconds": round(time.process_time() - cpu0), "rows": rows}
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
