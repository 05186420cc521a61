"""The sequential layer-wise calibration pass: collect a layer's input statistics, fit it,
write it back, move on.

Layers are visited in the order the model calls them, in *groups* of consecutive layers
that read the same input tensor (query/key/value). :func:`run_sequential` runs every
calibration batch through the model in its own thread; the threads pause at each group
until all have arrived, the group's statistics are computed from the inputs they hold and
its layers are fitted and written back, then the threads go on through the updated layers.
The model thus runs over the calibration data once, and only the current group's inputs
and statistics are held: peak memory is the model (plus the reference), one group's
inputs for all calibration batches, and one group's Hessians. The pruned weights of layers
every forward has gone past are held compactly until the pass ends
(:mod:`._parking`, lossless).

Where the inputs come from (``mode``):

* ``"sequential"`` (default): from the model as compressed so far, and the statistics also
  hold the cross term with the *original* model's inputs, so a layer can be fitted to
  reproduce the original model's outputs from the inputs it now sees.
* ``"sequential-local"``: from the compressed model; each layer keeps its own current output.
* ``"plain"``: from the original (reference) model, every layer in isolation.

:func:`collect_statistics` is the building block for other fits (e.g. a least-squares refit
after structured pruning, where the cross term is ``(d_original × d_pruned)``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from netpress._inputs import call_model, move_to, real_tokens, token_mask
from netpress.data import Data, batches
from netpress.errors import ModelError
from netpress.measure.collect import evaluating, model_device
from netpress.reconstruct._measure import trim_heap
from netpress.reconstruct._parking import Parked, park, unpark
from netpress.reconstruct._rendezvous import Aborted, Rendezvous
from netpress.reconstruct.layers import LayerView
from netpress.reconstruct.stats import Accumulator, LayerStats, Residual

__all__ = ["MODES", "LayerStats", "Solve", "Prepare", "plan_groups", "collect_statistics",
           "run_sequential"]

MODES = ("sequential", "sequential-local", "plain")


#: ``solve(name, layer, stats)``: fit the layer and write its new weights back.
Solve = Callable[[str, LayerView, LayerStats], None]

#: ``prepare(names, stats)``: adjust the statistics of the layers ``names`` (one group that
#: shares them, or one layer) in place, once, before any of them is fitted.
Prepare = Callable[[list[str], LayerStats], None]


class _Stop(Exception):
    """Raised by a hook once a group has all its inputs: the rest of the forward is skipped."""


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        raise ModelError("a reconstructed layer was called without a tensor input")
    return x


@contextmanager
def _capture(model: nn.Module, names: Sequence[str],
             calls: dict[str, int] | None) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Keep the inputs of ``names`` for one forward; with ``calls``, stop the forward once
    every layer has been called that many times."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[name].append(_first_input(args, kwargs).detach())
            if calls is not None and all(len(seen[n]) >= calls[n] for n in names):
                raise _Stop
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, inputs: Any) -> None:
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except _Stop:
        pass


def plan_groups(model: nn.Module, names: Sequence[str],
                inputs: Any) -> tuple[list[list[str]], dict[str, int], list[str]]:
    """Probe one forward: ``(groups in call order, calls per layer, layers never called)``.

    Consecutive layers whose first call reads the same tensor object form a group."""
    order: list[str] = []
    calls: dict[str, int] = {}
    last: list[Any] = [None]  # weak reference to the previous layer's input
    groups: list[list[str]] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                return
            x = _first_input(args, kwargs)
            prev = last[0]() if last[0] is not None else None
            if groups and prev is x:
                groups[-1].append(name)
            else:
                groups.append([name])
            last[0] = weakref.ref(x)
            order.append(name)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True)
               for n in names]
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, move_to(inputs, model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return groups, calls, [n for n in names if n not in calls]


def collect_statistics(model: nn.Module, reference: nn.Module | None, names: Sequence[str],
                       data: Data, *, mode: str = "sequential", full: bool = True,
                       calls: dict[str, int] | None = None, max_batches: int | None = None,
                       ) -> dict[str, LayerStats]:
    """Input statistics of the layers ``names`` over the calibration ``data``.

    ``model`` is the model being compressed and ``reference`` the original (needed unless
    ``mode="sequential-local"``); a layer's name must exist in both (its shape may differ,
    which shows in ``cross``). ``full=False`` keeps only ``sq_norms``. ``calls`` (from
    :func:`plan_groups`) lets each pass stop early. Padding positions of text batches are
    left out, as in :func:`run_sequential`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode != "sequential-local" and reference is None:
        raise ValueError(f"mode={mode!r} needs the reference model")
    views = {n: LayerView(model.get_submodule(n), n) for n in names}
    ref_views = {n: LayerView(reference.get_submodule(n), n) for n in names} \
        if reference is not None else {}
    acc = {n: Accumulator(full) for n in names}
    device = model_device(model)
    with evaluating(model), evaluating(reference or model):
        for i, (inputs, _) in enumerate(batches(data, name="calibration")):
            if max_batches is not None and i >= max_batches:
                break
            x = move_to(inputs, device)
            keep = token_mask(x)
            orig = comp = None
            if mode != "plain":
                with _capture(model, names, calls) as comp:
                    _run(model, x)
            if mode != "sequential-local":
                assert reference is not None
                with _capture(reference, names, calls) as orig:
                    _run(reference, x)
            for n in names:
                source = comp if comp is not None else orig
                assert source is not None
                view = views[n] if comp is not None else ref_views[n]
                plain = not (view.conv or (n in ref_views and ref_views[n].conv))
                for k, inp in enumerate(source[n]):
                    o = orig[n][k] if mode == "sequential" and orig else None
                    if plain:  # padding positions out of the rows (not of im2col columns)
                        inp, o = real_tokens(inp, keep), real_tokens(o, keep)
                    acc[n].add(view.columns(inp),
                               ref_views[n].columns(o) if o is not None else None)
    return {n: a.stats() for n, a in acc.items()}


@dataclass(frozen=True)
class _Runner:
    model: nn.Module
    compressed: bool
    batch: int


@dataclass
class _Pass:
    """What a pass keeps across its groups: the layers fitted, and the weights parked."""

    calls: dict[str, int]
    solved: list[str] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)

    def park_passed(self, model: nn.Module, before: int, groups: list[list[str]]) -> None:
        """Park the fitted weights of the layers of groups before ``before``: every forward
        has gone past them (each is called once), so nothing reads them until the end."""
        done = set(self.solved)
        for n in (n for g in groups[:before] for n in g):
            if n in done and n not in self.tried and self.calls.get(n) == 1:
                self.tried.add(n)
                got = park(model, model.get_submodule(n))
                if got is not None:
                    self.parked.append(got)

    def unpark_all(self) -> None:
        # the parked values were allocated in the calibration threads' arenas and are freed
        # there: trimmed as they go, the dense weights take their place instead of adding
        trim_heap()
        while self.parked:
            unpark(self.parked.pop())
            if len(self.parked) % 8 == 0:
                trim_heap()


def _group_action(groups: list[list[str]], runners: list[_Runner], model: nn.Module,
                  reference: nn.Module | None, solve: Solve, mode: str, full: bool,
                  state: _Pass, residual: bool = False,
                  masks: Sequence[torch.Tensor | None] = (), prepare: Prepare | None = None,
                  ) -> Callable[[int, list[tuple[int, Any]]], None]:
    """What runs when every forward pass has reached group ``k``: statistics, then fits.
    ``masks``: each calibration batch's real tokens (:func:`token_mask`), or None;
    ``prepare`` runs once on each set of statistics (the group's shared one, or each
    layer's) before the fits."""
    solved = state.solved

    def action(k: int, items: list[tuple[int, Any]]) -> None:
        names = groups[k]
        by_batch: dict[int, dict[bool, torch.Tensor]] = {}
        for tid, x in items:
            by_batch.setdefault(runners[tid].batch, {})[runners[tid].compressed] = x
        if not by_batch:
            return
        state.park_passed(model, k, groups)
        trim_heap()  # what the forwards since the last group freed into the threads' arenas
        views = {n: LayerView(model.get_submodule(n), n) for n in names}
        refs = {n: LayerView(reference.get_submodule(n), n) for n in names} \
            if reference is not None else views
        # layers that read one tensor as plain rows (not im2col) share one set of statistics
        shared = not any(views[n].conv or refs[n].conv for n in names)
        acc = {n: Accumulator(full) for n in (names[:1] if shared else names)}
        # the residual statistic (per layer: it holds the layer's weights) replaces the cross
        # term where asked for
        resid = {n: Residual(views[n]) for n in names} if residual \
            and mode == "sequential" else {}
        for b in sorted(by_batch):  # a fixed order: sums are deterministic
            comp, orig = by_batch[b].get(True), by_batch[b].get(False)
            keep = masks[b] if b < len(masks) and shared else None
            if isinstance(orig, dict):  # the original forwards ran ahead: W x_o per layer
                assert comp is not None
                keep = None  # their rows are the whole batch's: keep the inputs' too
                for n, r in resid.items():
                    r.add_outputs(views[n].columns(comp), orig[n])
                orig = None
            comp, orig = real_tokens(comp, keep), real_tokens(orig, keep)
            for c, o in _chunks(comp, orig):  # bounded im2col memory per step
                for n in acc:
                    cols = views[n].columns(c) if c is not None \
                        else refs[n].columns(o)  # type: ignore[arg-type]
                    cross = refs[n].columns(o) if mode == "sequential" and o is not None \
                        else None
                    acc[n].add(cols, cross, cross=not resid)
                    del cols, cross
                for n, r in resid.items():
                    if c is not None and o is not None:
                        r.add(views[n].columns(c), refs[n].columns(o))
        stats = acc[names[0]].stats() if shared else None
        if stats is not None and prepare is not None:
            prepare(list(names), stats)
        trim_heap()  # the statistics' float32 parts, before the fits' temporaries
        for i, n in enumerate(names):
            last = i == len(names) - 1
            # each fit gets its own LayerStats object; the last of a shared group gets the
            # engine's, whose reference is dropped first: a solver that sets a field to None
            # once used frees that tensor (the cross term: 75 MB for a 3072-wide layer)
            own = acc.pop(n).stats() if stats is None \
                else stats if last else replace(stats)
            if stats is None and prepare is not None:
                prepare([n], own)
            if last:
                stats = None
            own.owned = stats is None  # no later fit of the group reads these tensors
            if n in resid:
                own.residual = resid.pop(n).mean(own.samples)
            _solve_one(solve, n, views[n], own)
            del own
            solved.append(n)
            trim_heap()  # each fit's float64 temporaries
        del acc, stats
        trim_heap()
    return action


def _solve_one(solve: Solve, name: str, view: LayerView, stats: LayerStats) -> None:
    """``solve`` one layer; a Hessian that cannot be factored becomes a :class:`ModelError`
    naming the layer (float32 sums of inputs whose squares are below float32's range,
    around 1e-23 and smaller, are not positive definite at any damping)."""
    energy = float(stats.sq_norms.mean()) if stats.sq_norms.numel() else 0.0
    try:
        solve(name, view, stats)
    except torch.linalg.LinAlgError as exc:
        raise ModelError(
            f"layer {name!r}: its input Hessian is not positive definite after damping "
            f"({exc}); its inputs' mean squared value is {energy:.3g}, so they are (near) "
            f"zero or degenerate on the calibration data. Leave it out with "
            f"ignore=({name!r},), or give calibration data on which it sees real inputs"
        ) from None


def run_sequential(model: nn.Module, reference: nn.Module | None, names: Sequence[str],
                   data: Data, solve: Solve, *, mode: str = "sequential", full: bool = True,
                   max_batches: int | None = None, residual: bool = False,
                   prepare: Prepare | None = None) -> dict[str, Any]:
    """Fit the layers ``names`` of ``model`` group by group in call order (see the module
    docstring); ``solve`` writes each layer's new weights (after ``prepare``, when given,
    has adjusted each set of statistics once). Returns a summary.

    Every calibration batch runs in its own thread (one per model that supplies inputs)
    and pauses at each group until all batches are there (:mod:`._rendezvous`): the model
    runs over the data once, and the inputs of one group for all batches are held at a
    time. Batches of equal shapes run as one. A layer called more than once per forward is
    fitted on its first call's inputs. Text batches with an ``attention_mask`` contribute
    their real tokens only (:func:`netpress._inputs.real_tokens`: the padding positions'
    rows stay out of every statistic). ``residual=True`` (sequential mode) gives each fit
    :attr:`LayerStats.residual` instead of ``cross`` (for solvers that only refit to the
    original outputs: a smaller matrix than the cross term where a layer has fewer outputs
    than inputs).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    if mode != "sequential-local" and reference is None:
        raise ValueError(f"mode={mode!r} needs the reference model")
    started = time.perf_counter()
    device = model_device(model)
    inputs = _merged([move_to(x, device) for i, (x, _) in
                      enumerate(batches(data, name="calibration"))
                      if max_batches is None or i < max_batches])
    groups, calls, unused = plan_groups(model, names, inputs[0])
    runners = [_Runner(m, m is model, b) for m, use in
               ((model, mode != "plain"), (reference, mode != "sequential-local"))
               if use and m is not None for b in range(len(inputs))]
    state = _Pass(calls)
    # with the residual statistic, the original model's forwards need not wait at a group
    # holding its inputs: they keep the layers' outputs W x_o and go on to the next group
    # (the inputs of an FFN output layer are 4x wider than its outputs)
    ahead = AHEAD and residual and mode == "sequential" and reference is not None \
        and reference is not model \
        and not any(LayerView(model.get_submodule(n), n).conv for g in groups for n in g)
    # ...but only at groups whose outputs are narrower than their input (an FFN output
    # layer): ahead of Q/K/V or an FFN input layer they would hold 3-4x more than waiting
    ahead_at = {k for k, g in enumerate(groups) if ahead and _outputs_narrower(model, g)}
    meet = Rendezvous(len(runners), len(groups),
                      _group_action(groups, runners, model, reference, solve, mode, full,
                                    state, residual, [token_mask(x) for x in inputs],
                                    prepare))
    local = threading.local()
    handles = []
    for m in {id(r.model): r.model for r in runners}.values():
        for k, group in enumerate(groups):
            if k in ahead_at and m is not model:
                handles += [m.get_submodule(n).register_forward_pre_hook(
                    _ahead(meet, local, model, k, n, i == 0), with_kwargs=True)
                    for i, n in enumerate(group)]
            else:
                handles.append(m.get_submodule(group[0]).register_forward_pre_hook(
                    _arrival(meet, local, k), with_kwargs=True))
    try:
        with evaluating(model), evaluating(reference or model):
            threads = [threading.Thread(target=_forward, args=(meet, local, t, r, inputs),
                                        daemon=True) for t, r in enumerate(runners)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    finally:
        for h in handles:
            h.remove()
        state.unpark_all()  # every parked weight back, bit for bit (also after an error)
    if meet.error is not None:
        raise meet.error
    return {"layer_groups": len(groups), "calibration_batches": len(inputs),
            "not_called": unused + [n for g in groups for n in g if n not in state.solved],
            "calibration_seconds": round(time.perf_counter() - started, 3)}


_CHUNK = 64
#: let the original model's forwards run a group ahead with the residual statistic. Off:
#: on BERT-base with 32 x 128 calibration tokens it saved ~58 MiB of SparseGPT's peak, but
#: with 6,000 MiniLM calibration sentences it raised the peak from 6.3 to 7.7-8.2 GB (the
#: forwards' intermediates past the group, not traced); kept for memory experiments
AHEAD = False


def _chunks(comp: torch.Tensor | None, orig: torch.Tensor | None,
            ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Both inputs split alike into slices of ``_CHUNK`` samples along the batch dim."""
    ref = comp if comp is not None else orig
    assert ref is not None
    if ref.dim() == 0 or ref.shape[0] <= _CHUNK:
        return [(comp, orig)]
    parts = [t.split(_CHUNK) if t is not None else None for t in (comp, orig)]
    count = len(parts[0] or parts[1] or ())
    return [(parts[0][i] if parts[0] is not None else None,
             parts[1][i] if parts[1] is not None else None) for i in range(count)]


def _merged(inputs: list[Any]) -> list[Any]:
    """The batches as one, when every batch is a tensor (or a dict of tensors) of the same
    shape past the batch dimension: fewer threads, and less memory held by their allocators.
    """
    def key(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return (x.dtype, tuple(x.shape[1:]))
        if isinstance(x, dict) and all(isinstance(v, torch.Tensor) and v.dim() > 0
                                       for v in x.values()):
            return tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in x.items())
        return None

    keys = {key(x) for x in inputs}
    if len(inputs) < 2 or len(keys) != 1 or None in keys:
        return inputs
    if isinstance(inputs[0], torch.Tensor):
        return [torch.cat(inputs)]
    return [{k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}]


def _outputs_narrower(model: nn.Module, group: list[str]) -> bool:
    """Whether the group's layers' outputs together hold fewer values per token than the
    input they share (then keeping ``W x_o`` costs less than waiting with the input)."""
    views = [LayerView(model.get_submodule(n), n) for n in group]
    return sum(v.shape[0] * v.shape[1] for v in views) < views[0].shape[2]


def _arrival(meet: Rendezvous, local: threading.local, k: int) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if k in local.seen:  # later calls of a reused layer
            return
        local.seen.add(k)
        for j in sorted(p for p in local.pending if p < k):  # groups this forward ran ahead at
            meet.arrive(local.tid, j, local.pending.pop(j))
        meet.arrive(local.tid, k, _first_input(args, kwargs).detach())
    return hook


def _ahead(meet: Rendezvous, local: threading.local, model: nn.Module, k: int, name: str,
           first: bool) -> Callable[..., None]:
    """The original model's hook at layer ``name`` of group ``k`` when its forwards run a
    group ahead: at a group's first layer it hands over the previous group's outputs (and
    waits for that group's fits); at every layer it keeps ``W x_o`` (the compressed model's
    layer weights W, :meth:`Residual.outputs`) instead of its input, and goes on."""
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in local.reduced:  # later calls of a reused layer
            return
        local.reduced.add(name)
        if first and k - 1 in local.pending:
            meet.arrive(local.tid, k - 1, local.pending.pop(k - 1))
        x = LayerView(module, name).columns(_first_input(args, kwargs))
        outputs = Residual(LayerView(model.get_submodule(name), name)).outputs(x)
        local.pending.setdefault(k, {})[name] = outputs
    return hook


def _forward(meet: Rendezvous, local: threading.local, tid: int, runner: _Runner,
             inputs: list[Any]) -> None:
    local.tid, local.seen, local.reduced, local.pending = tid, set(), set(), {}
    try:
        with torch.no_grad():
            call_model(runner.model, inputs[runner.batch])
        for k in sorted(local.pending):  # the last groups' outputs, once the forward is done
            meet.arrive(tid, k, local.pending.pop(k))
    except Aborted:
        return
    except BaseException as exc:  # re-raised in the calling thread
        meet.fail(tid, exc)
        return
    meet.leave(tid)
