"""Text fidelity metrics against brute force, padding respected, and through compress()."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import netpress as npr
from netpress.errors import DataError
from netpress.measure.text import (
    LanguageModelTask,
    SentenceEmbeddingTask,
    lm_metrics,
    mean_pool,
    nearest_neighbours,
    next_token_sums,
    retrieval_agreement,
)


def _brute(ref, cmp, tokens, mask):
    tot = {"n": 0, "nr": 0.0, "nc": 0.0, "agree": 0, "kl": 0.0, "top5": 0.0}
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if not (mask[b, t] and mask[b, t + 1]):
                continue
            p = torch.softmax(ref[b, t].double(), -1)
            q = torch.softmax(cmp[b, t].double(), -1)
            y = int(tokens[b, t + 1])
            tot["n"] += 1
            tot["nr"] -= math.log(p[y])
            tot["nc"] -= math.log(q[y])
            tot["agree"] += int(p.argmax() == q.argmax())
            tot["kl"] += float((p * (p / q).log()).sum())
            a = set(p.topk(5).indices.tolist())
            c = set(q.topk(5).indices.tolist())
            tot["top5"] += len(a & c) / 5
    return tot


def test_next_token_metrics_match_brute_force_with_padding():
    torch.manual_seed(0)
    ref = torch.randn(3, 7, 11)
    cmp = ref + 0.7 * torch.randn(3, 7, 11)
    tokens = torch.randint(0, 11, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0  # left padding
    m = lm_metrics(next_token_sums(ref, cmp, tokens, mask))
    b = _brute(ref, cmp, tokens, mask)
    assert m["tokens"] == b["n"] == 6 + 3 + 4
    assert m["perplexity_reference"] == pytest.approx(math.exp(b["nr"] / b["n"]), rel=1e-9)
    assert m["perplexity_compressed"] == pytest.approx(math.exp(b["nc"] / b["n"]), rel=1e-9)
    assert m["agreement"] == pytest.approx(b["agree"] / b["n"])
    assert m["kl_mean"] == pytest.approx(b["kl"] / b["n"], rel=1e-9)
    assert m["top5_overlap"] == pytest.approx(b["top5"] / b["n"])
    same = lm_metrics(next_token_sums(ref, ref, tokens, mask))
    assert same["agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert same["top5_overlap"] == 1.0 and same["perplexity_ratio"] == pytest.approx(1.0)


def test_ignored_labels_and_empty_batches():
    ref = torch.randn(1, 4, 5)
    tokens = torch.tensor([[1, -100, 2, 3]])
    assert next_token_sums(ref, ref, tokens)["tokens"] == 2
    with pytest.raises(DataError, match="no token"):
        lm_metrics(next_token_sums(ref[:, :1], ref[:, :1], tokens[:, :1]))
    with pytest.raises(DataError, match="one shape"):
        next_token_sums(ref, ref[:, :3], tokens)


def test_retrieval_agreement_and_pooling_by_brute_force():
    torch.manual_seed(1)
    a = torch.randn(9, 4)
    b = a + 0.5 * torch.randn(9, 4)
    nn_a = nearest_neighbours(a)
    for i in range(9):
        sims = [float(torch.cosine_similarity(a[i], a[j], 0)) if j != i else -9 for j in range(9)]
        assert int(nn_a[i]) == max(range(9), key=lambda j: sims[j])
    brute = sum(int(nearest_neighbours(a)[i] == nearest_neighbours(b)[i]) for i in range(9)) / 9
    assert retrieval_agreement(a, b) == pytest.approx(brute)
    assert retrieval_agreement(a, a) == 1.0
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(mean_pool(h, mask)[0], h[0, :3].mean(0))
    torch.testing.assert_close(mean_pool(h, mask)[1], h[1].mean(0))


transformers = pytest.importorskip("transformers")


def _batches(vocab, padded):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(3):
        ids = torch.randint(1, vocab, (4, 12), generator=gen)
        mask = torch.ones(4, 12, dtype=torch.long)
        if padded:
            mask[2, 7:] = 0
            mask[3, 5:] = 0
            ids = ids.masked_fill(mask == 0, 0)
        out.append(({"input_ids": ids, "attention_mask": mask}, None))
    return out


def test_lm_task_through_compress_on_a_tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    data = _batches(64, padded=True)
    res = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.5)], evaluate=data,
                       task=LanguageModelTask(), latency_batch_size=2)
    fid = res.report["fidelity"]
    assert fid["tokens"] == 3 * (11 + 11 + 6 + 4)
    assert 0.0 <= fid["agreement"] <= 1.0 and fid["kl_mean"] > 0
    assert fid["perplexity_reference"] > 1
    ident = npr.compress(model, [npr.GlobalMagnitudePrune(sparsity=0.0)], evaluate=data,
                         task=LanguageModelTask(), measure=True, latency_batch_size=2)
    assert ident.report["agreement"] == 1.0


def test_sentence_embeddings_ignore_padding():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    task = SentenceEmbeddingTask()
    (x, _), = _batches(64, padded=True)[:1]
    with torch.no_grad():
        padded = task.embed(model(**x), x)
        alone = task.embed(model(input_ids=x["input_ids"][3:, :5]), {})
    torch.testing.assert_close(padded[3:], alone, atol=1e-5, rtol=1e-4)
    metrics, n, _ = task.compare_models(model, model, _batches(64, padded=True))
    assert n == 12 and metrics["cosine_mean"] == pytest.approx(1.0)
    assert metrics["retrieval_agreement"] == 1.0


def test_neighbour_margin_matches_brute_force():
    from netpress.measure.text import neighbour_margin

    emb = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = neighbour_margin(emb)
    for i in range(7):
        sims = sorted((float(torch.cosine_similarity(emb[i], emb[j], dim=0))
                       for j in range(7) if j != i), reverse=True)
        assert abs(float(got[i]) - (sims[0] - sims[1])) < 1e-9
    assert (got >= 0).all()
    with pytest.raises(DataError):
        neighbour_margin(emb[:2])


def test_lm_task_scores_an_encoder_decoder_on_its_decoder_tokens():
    """Logits of an encoder-decoder run along decoder_input_ids (another length than the
    encoder's input_ids): the task reads the decoder's tokens and mask."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                d_kv=16, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(3)
    dec_mask = torch.ones(2, 5, dtype=torch.long)
    dec_mask[1, 3:] = 0
    batch = {"input_ids": torch.randint(1, 64, (2, 9), generator=g),
             "attention_mask": torch.ones(2, 9, dtype=torch.long),
             "decoder_input_ids": torch.randint(1, 64, (2, 5), generator=g),
             "decoder_attention_mask": dec_mask}
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.05 * torch.randn(other.lm_head.weight.shape, generator=g))
    metrics, n, _ = LanguageModelTask().compare_models(model, other, [(batch, None)])
    # positions t with decoder tokens t and t + 1 real: 4 in the first row, 2 in the second
    with torch.no_grad():
        r, c = model(**batch).logits, other(**batch).logits
    sums = next_token_sums(r, c, batch["decoder_input_ids"], dec_mask.bool())
    assert n == 2 and sums["tokens"] == 6
    assert metrics["agreement"] == pytest.approx(sums["agree"] / 6)
    assert metrics["kl_mean"] == pytest.approx(sums["kl"] / 6)
