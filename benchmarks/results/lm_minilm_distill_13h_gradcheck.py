"""The gradient of ``benchmarks/_self_relation.py``'s hook equals that of ``loss + W *
self_relation_kl`` computed directly, on a tiny random BERT (ad hoc check, eighth part).

    .venv/bin/python benchmarks/results/lm_minilm_distill_13h_gradcheck.py
"""

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[1]))
from _self_relation import PARTS, relation_heads, self_relation, strip

from netpress.recover.losses import self_relation_kl

W = 700.0  # large, so that the term visibly changes the gradients


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in model.parameters()]


def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=32,
                              hidden_dropout_prob=0, attention_probs_dropout_prob=0)
s, t = transformers.BertModel(cfg).eval(), transformers.BertModel(cfg).eval()
mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 2 + [0] * 3])
x = {"input_ids": torch.randint(0, 50, (3, 5)), "attention_mask": mask}

with self_relation(s, t, [1], W) as values:
    with torch.no_grad():
        t(**x)
    s(**x).last_hidden_state.sum().backward()
hooked = grads(s)
strip(s)
assert not s._forward_hooks and not s._forward_pre_hooks

cap: dict[tuple[str, str], torch.Tensor] = {}
handles = [getattr(m.encoder.layer[1].attention.self, p).register_forward_hook(
    lambda _m, _a, o, k=(r, p): cap.__setitem__(k, o))
    for r, m in (("s", s), ("t", t)) for p in PARTS]
s.zero_grad()
with torch.no_grad():
    t(**x)
out = s(**x).last_hidden_state
term = self_relation_kl(tuple(cap["s", p] for p in PARTS), tuple(cap["t", p] for p in PARTS),
                        mask, relation_heads((24, 24), 12))
(out.sum() + W * term).backward()
direct = grads(s)
for h in handles:
    h.remove()
s.zero_grad()
s(**x).last_hidden_state.sum().backward()
print("term", values, "max |hooked - direct| gradient", gap(hooked, direct),
      "max |hooked - without term|", gap(hooked, grads(s)))
