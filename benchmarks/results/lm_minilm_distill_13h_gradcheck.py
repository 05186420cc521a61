import sys, torch, transformers
sys.path.insert(0, "benchmarks")
from _self_relation import self_relation, strip, PARTS, relation_heads
from netpress.recover.losses import self_relation_kl
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=32, hidden_dropout_prob=0, attention_probs_dropout_prob=0)
s, t = transformers.BertModel(cfg).eval(), transformers.BertModel(cfg).eval()
x = {"input_ids": torch.randint(0, 50, (3, 5)), "attention_mask": torch.tensor([[1]*5, [1]*3+[0]*2, [1]*2+[0]*3])}
with self_relation(s, t, [1], 700.0) as vals:
    with torch.no_grad(): t(**x)
    out = s(**x).last_hidden_state
    out.sum().backward()
g1 = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in s.parameters()]
s.zero_grad()
strip(s)
assert not s._forward_hooks
cap = {}
hs = [getattr(m.encoder.layer[1].attention.self, p).register_forward_hook(
    lambda _m, _a, o, k=(r, p): cap.__setitem__(k, o)) for r, m in (("s", s), ("t", t)) for p in PARTS]
with torch.no_grad(): t(**x)
out = s(**x).last_hidden_state
loss = out.sum() + 700.0 * self_relation_kl(tuple(cap["s", p] for p in PARTS), tuple(cap["t", p] for p in PARTS), x["attention_mask"], 12 if False else relation_heads((24, 24), 12))
loss.backward()
err = max((a - (torch.zeros_like(p) if p.grad is None else p.grad)).abs().max().item() for a, p in zip(g1, s.parameters()))
print("relation", vals, "max grad diff", err)
s.zero_grad()
for h in hs: h.remove()
s(**x).last_hidden_state.sum().backward()
print("diff vs no relation term", max((a - (torch.zeros_like(p) if p.grad is None else p.grad)).abs().max().item() for a, p in zip(g1, s.parameters())))
