"""Static INT8 of a token-major model: equalization reads a Linear's channels in the last
dimension, and calibration ranges and bias sums skip padding tokens."""

import pytest
import torch
from torch import nn

import netpress as npr
import netpress.quant._equalize_stats as equalize_stats
import netpress.quant.observers as observers
import netpress.quant.ranges as ranges


class TokenModel(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear per token (torch.fx traces it); the padding
    token's embedding row is 50x the others, as a pad row that never trained can be."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            self.emb.weight[0] *= 50

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(input_ids))))


def _batches(real: int = 6, padded_to: int = 12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 10, (8, padded_to), generator=g)
    mask = torch.zeros(8, padded_to, dtype=torch.long)
    mask[:, :real] = 1
    ids[:, real:] = 0
    padded = [({"input_ids": ids, "attention_mask": mask}, None)]
    short = [({"input_ids": ids[:, :real], "attention_mask": mask[:, :real]}, None)]
    return padded, short


def _scales(model: nn.Module) -> list[float]:
    return [float(m.scale) for m in model.modules() if type(m).__name__ == "ActQuant"]


def _real_error(model: nn.Module, reference: nn.Module, batch) -> float:
    (inputs, _), = batch
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        a, b = model(**inputs)[keep], reference(**inputs)[keep]
    return float((a - b).norm() / b.norm())


def test_padded_calibration_gives_the_ranges_of_the_real_tokens():
    model = TokenModel().eval()
    padded, short = _batches()
    exact = dict(equalize=False, range_search=False)
    a = npr.compress(model, [npr.Quantize(**exact)], calibration=padded, measure=False).model
    b = npr.compress(model, [npr.Quantize(**exact)], calibration=short, measure=False).model
    assert _scales(a) == pytest.approx(_scales(b), rel=1e-6)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), name  # bias sums too


def test_token_major_model_quantizes_with_equalization_and_fits_the_real_tokens(monkeypatch):
    model = TokenModel().eval()
    padded, _ = _batches()
    fixed = npr.compress(model, [npr.Quantize()], calibration=padded, measure=False).model
    err = _real_error(fixed, model, padded)
    assert err < 0.05
    for module in (observers, ranges, equalize_stats):  # padding observed, as before
        monkeypatch.setattr(module, "token_mask", lambda inputs: None)
    kept = npr.compress(model, [npr.Quantize()], calibration=padded, measure=False).model
    assert err < 0.5 * _real_error(kept, model, padded)
    assert max(_scales(fixed)) < 0.5 * max(_scales(kept))
