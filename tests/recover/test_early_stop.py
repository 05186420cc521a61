"""Early stopping on agreement: stops, restores the best weights, keeps masks, validates."""

import pytest
import torch

import netpress as npr
from netpress.measure import agreement, collect_pair
from netpress.recover.early_stop import agreement_count
from netpress.testing import toy_batches, varied_teacher, weight_sparsity


@pytest.fixture(scope="module")
def task():
    model = varied_teacher()
    faithful = toy_batches(n=320, batch=32, model=model)
    # Labels shifted by one class: fine-tuning on them drives the model away from the reference.
    wrong = [(x, (y + 1) % 4) for x, y in faithful]
    return model, faithful, wrong, toy_batches(n=512, seed=1, model=model)


def test_agreement_count_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert agreement_count(torch.tensor([0, 1, 1]), logits) == 2


def test_early_stop_restores_the_best_weights_and_keeps_masks(task):
    model, _, wrong, test = task
    prune = npr.GlobalMagnitudePrune(sparsity=0.5)
    pruned = npr.compress(model, [prune], measure=False).model
    harmful = dict(max_steps=60, lr=5e-2, lr_schedule="constant")
    plain = npr.compress(model, [prune, npr.FineTune(**harmful)], train=wrong,
                         measure=False).model
    stopped = npr.compress(model, [prune, npr.FineTune(**harmful, early_stop_patience=2,
                                                      eval_every=4)],
                           train=wrong, measure=False)
    rec = stopped.report["steps"][-1]["early_stop"]
    assert rec["stopped_early"] is True and rec["best_step"] == 0
    assert stopped.report["steps"][-1]["steps"] <= 12  # 3 checks of 4 steps, then it stops
    assert rec["held_out"] == 64  # every 5th of 10 batches of 32
    ref_out, pruned_out, _ = collect_pair(model, pruned, test)
    _, plain_out, _ = collect_pair(model, plain, test)
    _, stop_out, _ = collect_pair(model, stopped.model, test)
    assert agreement(ref_out, plain_out) < 0.6
    assert agreement(ref_out, stop_out) == pytest.approx(agreement(ref_out, pruned_out))
    assert weight_sparsity(stopped.model) == pytest.approx(weight_sparsity(pruned), abs=1e-6)


def test_early_stop_keeps_improving_recovery(task):
    model, faithful, _, test = task
    prune = npr.GlobalMagnitudePrune(sparsity=0.8)
    pruned = npr.compress(model, [prune], measure=False).model
    out = npr.compress(model, [prune, npr.Distill(max_steps=80, lr=5e-3, early_stop_patience=3,
                                                  eval_every=8)],
                       train=faithful, evaluate=test, measure=False)
    rec = out.report["steps"][-1]["early_stop"]
    assert rec["best_step"] > 0 and rec["best_agreement"] > 0.55
    ref_out, pruned_out, _ = collect_pair(model, pruned, test)
    _, out_out, _ = collect_pair(model, out.model, test)
    assert agreement(ref_out, out_out) > agreement(ref_out, pruned_out) + 0.05
    assert weight_sparsity(out.model) == pytest.approx(0.8, abs=1e-3)


def test_early_stop_on_evaluate_data(task):
    model, faithful, _, test = task
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8),
                               npr.FineTune(max_steps=10, early_stop_patience=5,
                                            early_stop_data="evaluate")],
                       train=faithful, evaluate=test, measure=False)
    rec = out.report["steps"][-1]["early_stop"]
    assert rec["held_out"] == 512 and rec["checks"] == 2  # step 0 and the last (one epoch)


def test_early_stop_with_a_ramp_keeps_only_final_masks(task):
    model, _, wrong, _ = task
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.7, schedule="cubic"),
                               npr.FineTune(max_steps=40, lr=5e-2, early_stop_patience=1,
                                            eval_every=2)],
                       train=wrong, measure=False)
    rec = out.report["steps"][-1]["early_stop"]
    assert rec["best_step"] >= 0.7 * 40 - 2  # no weights kept while the ramp moved
    assert weight_sparsity(out.model) == pytest.approx(0.7, abs=1e-3)


def test_label_preserve_with_early_stop(task):
    model, faithful, _, _ = task
    out = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.8),
                               npr.LabelPreserve(max_steps=20, lr=5e-3, early_stop_patience=2,
                                                 eval_every=5,
                                                 candidates=((0.0, 1.0, 0.0), (1.0, 1.0, 1.0)))],
                       train=faithful, measure=False)
    rec = out.report["steps"][-1]
    assert len(rec["trials"]) == 2 and rec["early_stop"]["checks"] >= 2


@pytest.mark.parametrize("kwargs, match", [
    ({"early_stop_patience": 0}, "early_stop_patience=0"),
    ({"early_stop_patience": 1.5}, "early_stop_patience=1.5"),
    ({"eval_every": 0}, "eval_every=0"),
    ({"early_stop_data": "test"}, "early_stop_data='test'"),
    ({"validation_fraction": 0.0}, "validation_fraction=0.0"),
    ({"validation_fraction": 0.9}, "validation_fraction=0.9"),
])
def test_early_stop_fields_are_validated(kwargs, match):
    with pytest.raises(npr.RecipeError, match=match):
        npr.FineTune(**kwargs)


def test_lc_refuses_early_stopping_and_configs_round_trip():
    with pytest.raises(npr.RecipeError, match="LC: early stopping"):
        npr.LC(early_stop_patience=2)
    cfg = npr.Distill(early_stop_patience=3, eval_every=10, early_stop_data="evaluate")
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg


def test_evaluate_source_needs_evaluate_data(task):
    model, faithful, _, _ = task
    with pytest.raises(npr.DataError, match="evaluate"):
        npr.compress(model, [npr.FineTune(max_steps=2, early_stop_patience=1,
                                          early_stop_data="evaluate")],
                     train=faithful, measure=False)


def test_batch_score_counts_real_tokens_and_cosines():
    from netpress.recover.early_stop import batch_score

    ref = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cmp = torch.tensor([[1, 0, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    inputs = {"input_ids": ref, "attention_mask": mask}
    assert batch_score(ref, cmp, inputs, hidden=False) == (3.0, 5)  # padding not counted
    assert batch_score(ref, cmp, ref, hidden=False) == (4.0, 6)
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    b = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    score, n = batch_score(a, b, None, hidden=True)
    assert n == 2 and abs(score - 1.0) < 1e-6  # cosines 0 and 1


def test_early_stop_on_a_sentence_encoder_never_ends_below_its_start():
    """A text encoder's monitor scores the mean-pooled cosine over batches of other lengths
    (top-1 of hidden dimensions means nothing); a harmful distillation is undone."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     initializer_range=0.5)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for length in (6, 9, 12, 7, 10):  # batches of different lengths, some padding
        mask = torch.ones(4, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        data.append(({"input_ids": torch.randint(0, 64, (4, length), generator=g),
                      "attention_mask": mask}, None))
    prune = npr.GlobalMagnitudePrune(sparsity=0.6)
    start = npr.compress(model, [prune], evaluate=data, task="sentence-embedding")
    harmful = npr.Distill(max_steps=20, lr=0.3, optimizer="sgd", early_stop_patience=2,
                          eval_every=2, early_stop_data="evaluate")
    res = npr.compress(model, [prune, harmful], train=data, evaluate=data,
                       task="sentence-embedding")
    rec = res.report["steps"][-1]["early_stop"]
    assert "best_cosine" in rec and rec["held_out"] == 20
    assert res.report["fidelity"]["cosine_mean"] >= start.report["fidelity"]["cosine_mean"] - 1e-6
    assert abs(rec["best_cosine"] - res.report["fidelity"]["cosine_mean"]) < 1e-4
