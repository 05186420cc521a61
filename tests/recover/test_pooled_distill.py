"""Distill on padded text batches: the mean-pooled output term, the relational (batch
similarity-matrix) term and padding-masked features."""

import copy
import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.recover.losses import mean_pool, similarity_loss


class _Encoder(nn.Module):
    """Per-token states [B, T, C] from dict inputs, through two named blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.block1 = nn.Linear(8, 8)
        self.block2 = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.block2(torch.tanh(self.block1(self.emb(input_ids))))


def _batch(pad_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    mask[3, 6:] = 0
    return {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)),
            "attention_mask": mask}


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = _Encoder()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return student, teacher


def test_mean_pool_matches_brute_force():
    x = torch.randn(4, 7, 3)
    mask = _batch(0)["attention_mask"]
    brute = torch.stack([x[b, mask[b].bool()].mean(0) for b in range(4)])
    assert torch.allclose(mean_pool(x, mask), brute, atol=1e-6)
    assert torch.allclose(mean_pool(x, torch.ones(4, 7)), x.mean(1), atol=1e-6)


@pytest.mark.parametrize("kw", [{"pooled_weight": 1.0},
                                {"features": ("block1",), "feature_weight": 1.0},
                                {"features": ("re:block\\d",), "pooled_weight": 2.0},
                                {"relation_weight": 3.0}])
def test_pooled_feature_and_relation_terms_do_not_see_padding(kw):
    student, teacher = _pair()
    outs = []
    for pad_id in (0, 9, 19):  # different padding tokens: the same update
        step = npr.Distill(max_steps=2, lr=1e-2, loss="cosine", dropout=False, **kw)
        outs.append(npr.compress(student, [step], reference=teacher,
                                 train=[(_batch(pad_id), None)], measure=False).model)
    for other in outs[1:]:
        for a, b in zip(outs[0].parameters(), other.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(outs[0].block1.weight, student.block1.weight)


def _pooled_cosine(model: nn.Module, teacher: nn.Module, data) -> float:
    with torch.no_grad():
        cos = [torch.cosine_similarity(mean_pool(model(**x), x["attention_mask"]),
                                       mean_pool(teacher(**x), x["attention_mask"]), dim=-1)
               for x, _ in data]
    return float(torch.cat(cos).mean())


def test_pooled_term_brings_sentence_embeddings_closer():
    student, teacher = _pair(1)
    data = [(_batch(0, seed=s), None) for s in range(8)]
    before = _pooled_cosine(student, teacher, data)
    common = {"max_steps": 40, "lr": 1e-2, "loss": "cosine", "dropout": False}
    pooled = npr.compress(student, npr.Distill(pooled_weight=1.0, alpha=1.0, **common),
                          reference=teacher, train=data, measure=False).model
    after = _pooled_cosine(pooled, teacher, data)
    assert after > before + 0.05 and after > 0.9


def test_pooled_weight_round_trips_and_is_checked():
    cfg = npr.Distill(max_steps=3, pooled_weight=0.5, features=("re:x",))
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg
    for bad in (-1.0, True, float("inf"), "1"):
        with pytest.raises(RecipeError, match="pooled_weight"):
            npr.Distill(pooled_weight=bad)  # type: ignore[arg-type]


def _brute(s: torch.Tensor, t: torch.Tensor) -> float:
    terms = []
    for i, j in itertools.permutations(range(s.shape[0]), 2):
        cs = float(torch.dot(s[i], s[j]) / (s[i].norm() * s[j].norm()))
        ct = float(torch.dot(t[i], t[j]) / (t[i].norm() * t[j].norm()))
        terms.append((cs - ct) ** 2)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_similarity_loss_matches_brute_force(n):
    g = torch.Generator().manual_seed(n)
    s, t = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    assert float(similarity_loss(s, t)) == pytest.approx(_brute(s, t), rel=1e-5, abs=1e-7)


def test_similarity_loss_sees_only_angles_between_rows():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 4, generator=g)
    scaled = t * torch.rand(5, 1, generator=g).add(0.5)  # each row rescaled: same angles
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))  # a rotation: same angles
    assert float(similarity_loss(scaled, t)) < 1e-10
    assert float(similarity_loss(t @ q, t)) < 1e-10
    assert float(similarity_loss(t[:1], t[:1] + 1)) == 0.0  # one row: no pair
    assert float(similarity_loss(t.flip(0), t)) > 1e-3


def test_relation_step_matches_brute_force():
    student, teacher = _pair(3)
    x = _batch(0, seed=5)
    cfg = npr.Distill(max_steps=1, lr=0.1, optimizer="sgd", momentum=0.0, loss="cosine",
                      dropout=False, pooled_weight=0.5, relation_weight=4.0)
    got = npr.compress(student, [cfg], reference=teacher, train=[(x, None)],
                       measure=False).model
    manual = copy.deepcopy(student)
    mask = x["attention_mask"].bool()
    s, t = manual(**x), teacher(**x).detach()
    tokens = (1 - F.cosine_similarity(s[mask], t[mask], dim=-1)).mean()
    ps, pt = mean_pool(s, mask), mean_pool(t, mask)
    pooled = (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
    ns, nt = F.normalize(ps, dim=-1), F.normalize(pt, dim=-1)
    pairs = [(ns[i] @ ns[j] - nt[i] @ nt[j]) ** 2 for i, j in itertools.permutations(range(4), 2)]
    (tokens + 0.5 * pooled + 4.0 * torch.stack(pairs).mean()).backward()
    with torch.no_grad():
        for p in manual.parameters():
            p.sub_(0.1 * p.grad)
    for a, b in zip(got.parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # and the relational term changes the step
    plain = npr.compress(student, [dataclasses.replace(cfg, relation_weight=0.0)],
                         reference=teacher, train=[(x, None)], measure=False).model
    assert not torch.allclose(plain.block1.weight, got.block1.weight, atol=1e-5)


def test_relation_weight_round_trips_and_is_checked():
    cfg = npr.Distill(max_steps=3, relation_weight=2.0)
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg
    for bad in (-1.0, True, float("inf"), "1"):
        with pytest.raises(RecipeError, match="relation_weight"):
            npr.Distill(relation_weight=bad)  # type: ignore[arg-type]
