"""End-to-end search: strategies, early stopping, outputs, resume after SIGKILL, Ray, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netpress.errors import RecipeError
from netpress.measure.constraints import MaxAccuracyDrop, MinAgreement
from netpress.search import pareto_indices, parse_constraint, search
from netpress.search.evaluate import Evaluator, optimistic_report
from netpress.search.objectives import Size

from ._toy import toy_data, toy_model, toy_space

HERE = Path(__file__).parent


def test_parse_constraint() -> None:
    assert parse_constraint("agreement>=0.99") == MinAgreement(0.99)
    assert parse_constraint("accuracy_drop <= 1%") == MaxAccuracyDrop(0.01)
    assert parse_constraint("class_agreement>=0.9").value == pytest.approx(0.1)  # type: ignore[attr-defined]
    with pytest.raises(RecipeError):
        parse_constraint("agreement<=0.5")


def test_pareto_indices() -> None:
    pts = [(3.0, 0.1), (1.0, -0.2), (2.0, 0.05), (2.5, 0.0), (1.0, -0.3)]
    assert pareto_indices(pts) == [1, 2, 0]


def test_optimistic_report_bounds_the_final_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 4, (200,), generator=g)
    labels = torch.where(torch.rand(200, generator=g) < 0.8, ref, (ref + 1) % 4)
    cmp = torch.where(torch.rand(200, generator=g) < 0.9, ref, (ref + 2) % 4)
    full = optimistic_report(ref, cmp, labels)
    for seen in (50, 100, 150):
        part = optimistic_report(ref, cmp[:seen], labels)
        assert part["agreement"] >= full["agreement"]
        assert part["compressed"]["accuracy"] >= full["compressed"]["accuracy"]
        assert part["fidelity"]["worst_class_agreement"] >= \
            full["fidelity"]["worst_class_agreement"]


def test_evaluator_stops_only_hopeless_trials() -> None:
    model, data = toy_model(), toy_data()
    space = toy_space(model)
    ev = Evaluator(model, objective=Size(), constraints=[MinAgreement(0.95)], evaluate=data,
                   chunk=50)
    dense = {k: (0.0 if k.startswith("sparsity") else 8) for k in space.params}
    wrecked = {k: (0.8 if k.startswith("sparsity") else 4) for k in space.params}
    good = ev.run(space.build(dense))
    bad = ev.run(space.build(wrecked))
    assert good.feasible and not good.early_stopped and good.n_evaluated == 400
    assert good.metrics["agreement"] >= 0.95
    assert bad.early_stopped and not bad.feasible and bad.n_evaluated == 50
    full_bad = ev.run(space.build(wrecked), early_stop=False)
    assert full_bad.metrics["agreement"] < 0.95  # the stop was right
    assert bad.objective == full_bad.objective and bad.objective < good.objective  # type: ignore[operator]


@pytest.mark.parametrize("strategy", ["gp", "tpe", "random", "knapsack", "gp+knapsack"])
def test_strategies_find_feasible_smaller_models(strategy: str, one_thread: None) -> None:
    model, data = toy_model(), toy_data()
    dense = Size().measure(model, toy_space(model).build(
        {k: (0.0 if k.startswith("sparsity") else 8) for k in toy_space(model).params}),
        data[0][0][:1])
    result = search(model, toy_space(model), objective="size",
                    constraints=["agreement>=0.95"], trials=6, strategy=strategy,
                    evaluate=data, chunk=100, seed=0)
    assert len(result.trials) == 6
    assert result.best_value is not None and result.best_value < 0.9 * dense
    assert result.final is not None and result.final["verified"]
    curve = result.curve()
    assert all(a is None or b is not None and b <= a for a, b in zip(curve, curve[1:]))
    if strategy == "knapsack":
        assert all(t["source"] == "knapsack" for t in result.trials[:3])


def test_result_outputs(tmp_path: Path) -> None:
    model, data = toy_model(), toy_data()
    result = search(model, toy_space(model), constraints=["agreement>=0.95"], trials=5,
                    strategy="random", evaluate=data, seed=1)
    result.save(tmp_path)
    log = json.loads((tmp_path / "search.json").read_text())
    assert len(log["trials"]) == 5 and log["best_value"] == result.best_value
    assert all({"params", "recipe", "outcome"} <= set(t) for t in log["trials"])
    from netpress.config import Recipe

    saved = Recipe.load(tmp_path / "best_recipe.yaml")
    assert saved == result.best_recipe
    assert set(saved.steps[0].per_layer) == {"conv1", "conv2", "fc"}  # type: ignore[attr-defined]
    assert (tmp_path / "pareto.md").read_text().startswith("| trial")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    front = result.pareto
    assert front and all(not t["outcome"]["early_stopped"] for t in front)


def test_journal_rejects_a_different_search(tmp_path: Path) -> None:
    model, data = toy_model(), toy_data()
    journal = tmp_path / "j.log"
    search(model, toy_space(model), constraints=["agreement>=0.95"], trials=1,
           strategy="random", evaluate=data, journal=journal)
    with pytest.raises(RecipeError, match="different search"):
        search(model, toy_space(model), constraints=["agreement>=0.9"], trials=1,
               strategy="random", evaluate=data, journal=journal)


def test_resume_after_sigkill_keeps_every_finished_trial(tmp_path: Path) -> None:
    journal, target = tmp_path / "journal.log", 6
    cmd = [sys.executable, str(HERE / "_resume_script.py"), str(journal), str(target)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        if line.startswith("trial "):
            seen += 1
            if seen == 2:
                break
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: the third trial is running
    proc.wait(timeout=30)
    assert seen == 2, "the search ended before it could be killed"

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    def finished() -> dict[int, tuple[dict[str, object], float | None]]:
        study = optuna.load_study(study_name="netpress-search",
                                  storage=JournalStorage(JournalFileBackend(str(journal))))
        return {t.number: (t.params, t.user_attrs["outcome"]["objective"])
                for t in study.trials if "outcome" in t.user_attrs}

    before = finished()
    assert len(before) >= 2
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"FINISHED {target}" in out.stdout
    after = finished()
    assert len(after) == target
    for number, record in before.items():
        assert after[number] == record  # no completed trial lost or re-run


def test_ray_runs_the_same_trials_in_parallel() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"!!! Ray is not installed ({exc}); pip install 'netpress[ray]' to run the "
                    f"distributed search test !!!")
    model, data = toy_model(), toy_data()
    kw = dict(constraints=["agreement>=0.95"], trials=6, strategy="random", evaluate=data,
              seed=3)
    local = search(model, toy_space(model), **kw)  # type: ignore[arg-type]
    remote = search(model, toy_space(model), ray_address="local", workers=2,
                    **kw)  # type: ignore[arg-type]

    def key(t: dict[str, object]) -> tuple[object, ...]:
        o = t["outcome"]
        assert isinstance(o, dict)
        return (tuple(sorted(t["params"].items())), o["objective"],  # type: ignore[attr-defined]
                o["feasible"], o["n_evaluated"])

    assert sorted(map(key, local.trials)) == sorted(map(key, remote.trials))
    workers = {t["outcome"]["worker"] for t in remote.trials}  # type: ignore[index]
    assert len(workers) == 2, workers  # two Ray workers shared the trials
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)
    assert remote.best_value == local.best_value


def test_cli_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from netpress.search.cli import add_parser, run

    monkeypatch.syspath_prepend(str(HERE))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "search", "--model", "netpress.testing:TinyCNN", "--data", "_toy:data_factory",
        "--objective", "size", "--constraint", "agreement>=0.9", "--trials", "4",
        "--strategy", "tpe", "--sparsity", "0.0:0.8:0.1", "--bits", "4,8",
        "--eval-limit", "200", "--out", str(tmp_path)])
    assert run(args) == 0
    log = json.loads((tmp_path / "search.json").read_text())
    assert len(log["trials"]) == 4 and log["final"]["n_evaluated"] == 400
    assert (tmp_path / "journal.log").is_file() and (tmp_path / "best_recipe.yaml").is_file()
