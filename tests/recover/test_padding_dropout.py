"""Recovery on padded text batches: padding never enters the loss; ``dropout=False`` trains
in eval mode."""

import copy

import pytest
import torch
from torch import nn

import netpress as npr
from netpress.errors import RecipeError
from netpress.recover.loop import train_mode
from netpress.recover.losses import cosine_loss, real_tokens


class _TinyEncoder(nn.Module):
    """Per-token hidden states [B, T, C] from dict inputs (ids + attention mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lin(self.drop(self.emb(input_ids)))


def _batch(pad_id: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)),
            "attention_mask": mask}


def test_real_tokens_matches_brute_force_and_ignores_padding():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    mask = _batch(0)["attention_mask"]
    rs, rt, _ = real_tokens(mask, s, t, None)
    brute = [1 - torch.cosine_similarity(s[b, i], t[b, i], dim=0)
             for b in range(3) for i in range(6) if mask[b, i]]
    assert rs.shape == (int(mask.sum()), 4)
    assert torch.allclose(cosine_loss(rs, rt), torch.stack(brute).mean(), atol=1e-6)
    s2 = torch.where(mask.bool()[..., None], s, torch.randn(3, 6, 4) * 100)
    assert torch.equal(cosine_loss(*real_tokens(mask, s2, t, None)[:2]), cosine_loss(rs, rt))
    pooled = torch.randn(3, 4)  # not per token: unchanged
    assert real_tokens(mask, pooled, pooled, None)[0] is pooled


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_distill_step_does_not_see_padding(loss):
    torch.manual_seed(0)
    student = _TinyEncoder()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.lin.weight.add_(0.3 * torch.randn_like(teacher.lin.weight))
    outs = []
    for pad_id in (0, 7, 19):  # different padding tokens: the same update
        step = npr.Distill(max_steps=1, lr=1e-2, loss=loss, dropout=False)
        outs.append(npr.compress(student, [step], reference=teacher,
                                 train=[(_batch(pad_id), None)], measure=False).model)
    for other in outs[1:]:
        assert torch.allclose(outs[0].lin.weight, other.lin.weight, atol=1e-7)
    assert not torch.allclose(outs[0].lin.weight, student.lin.weight)


def test_dropout_false_trains_in_eval_mode_but_bn_follows_bn():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    train_mode(model, "train", dropout=False)
    assert not model.training and not model[1].training and model[2].training
    train_mode(model, "frozen", dropout=False)
    assert not model[2].training
    train_mode(model, "train")
    assert model[1].training and model[2].training
    enc = _TinyEncoder()
    train_mode(enc, dropout=False)
    b = _batch(0)
    assert torch.equal(enc(**b), enc(**b))  # no dropout noise


def test_dropout_option_round_trips_and_is_checked():
    cfg = npr.Distill(max_steps=3, dropout=False)
    assert npr.Distill.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RecipeError, match="dropout"):
        npr.Distill(dropout="no")  # type: ignore[arg-type]
