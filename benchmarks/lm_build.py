"""Build (once) the small decoder language model that benchmarks/lm.py measures on.

No download: the corpus is text that ships with Python itself, the documentation topics of
``pydoc_data`` and the source of the top-level standard-library modules (about 5 MB). Every
20th document is held out. A byte-level BPE tokenizer (the ``tokenizers`` package) is trained on
the training split, then a Llama-style ``transformers`` model (6 blocks, width 256, grouped-query
attention with 4 query / 2 key-value heads, tied embeddings, 6.8M parameters) is trained from
scratch for a fixed number of steps (or until ``--max-minutes``; the steps done are recorded).

The result is cached outside git (benchmarks/results/cache/lm/ by default): a ``transformers``
directory (config, safetensors, tokenizer) plus ``tokens.pt`` (train / held-out token ids) and
``meta.json`` (corpus, tokenizer, training time, held-out perplexity). Run it in the background
on a shared machine::

    nice -n 2 .venv/bin/python benchmarks/lm_build.py     # ~45 min on 2 cores shared by 7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

CACHE = Path(__file__).parent / "results" / "cache" / "lm"
EOS = "<|endoftext|>"


def corpus_documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order: pydoc topics, then stdlib modules."""
    import pydoc_data.topics as topics

    docs = [(f"pydoc:{k}", topics.topics[k]) for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        docs.append((f"stdlib:{path.name}", path.read_text(encoding="utf-8", errors="replace")))
    return docs


def split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Every 20th document is held out."""
    train = [text for i, (_, text) in enumerate(docs) if i % 20 != 19]
    held = [text for i, (_, text) in enumerate(docs) if i % 20 == 19]
    return train, held


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok: Any, texts: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int16)


def model_config(vocab: int, args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0, attention_dropout=0.0)


def lr_at(step: int, steps: int, peak: float, warmup: int, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``.

    ``elapsed`` is the fraction of the time budget used: the decay follows whichever of the
    step count and the time budget runs out first, so a run stopped by the budget still ends
    with a decayed learning rate instead of being cut mid-schedule.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, steps - warmup), elapsed))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq: int, batch: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq`` tokens."""
    model.eval()
    n = (tokens.numel() - 1) // seq
    windows = tokens[: n * seq + 1].long()
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        x = torch.stack([windows[r * seq:(r + 1) * seq] for r in rows])
        y = torch.stack([windows[r * seq + 1:(r + 1) * seq + 1] for r in rows])
        logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                reduction="sum")
        total += float(nll)
        count += y.numel()
    return math.exp(total / count)


def train(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> list[float]:
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        if time.perf_counter() - started > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            elapsed = (time.perf_counter() - started) / (60 * args.max_minutes)
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup, elapsed)
        starts = torch.randint(0, tokens.numel() - args.seq - 1, (args.batch,), generator=gen)
        chunk = torch.stack([tokens[s:s + args.seq + 1] for s in starts.tolist()]).long()
        out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1].clone())
        # transformers shifts the labels itself: labels == inputs means next-token prediction
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch * args.seq / (time.perf_counter() - started)
            print(f"step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.3f}  "
                  f"{rate:.0f} tok/s", flush=True)
    return losses


def build(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    docs = corpus_documents()
    train_texts, held_texts = split(docs)
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"corpus {sum(len(t) for _, t in docs) / 1e6:.2f} MB in {len(docs)} documents; "
          f"{train_ids.numel()} train / {held_ids.numel()} held-out tokens", flush=True)
    model = LlamaForCausalLM(model_config(tok.get_vocab_size(), args))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)
    started = time.perf_counter()
    losses = train(model, train_ids, args)
    seconds = time.perf_counter() - started
    ppl = perplexity(model, held_ids, args.seq)
    print(f"trained in {seconds / 60:.1f} min; held-out perplexity {ppl:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=EOS)
    fast.save_pretrained(out / "model")
    torch.save({"train": train_ids, "held_out": held_ids}, out / "tokens.pt")
    digest = hashlib.sha256("".join(t for _, t in docs).encode()).hexdigest()[:16]
    meta = {"corpus": {"sources": "pydoc_data.topics + top-level stdlib *.py",
                       "python": sys.version.split()[0], "documents": len(docs),
                       "megabytes": round(sum(len(t) for _, t in docs) / 1e6, 2),
                       "held_out": "every 20th document", "sha256_16": digest,
                       "train_tokens": train_ids.numel(), "held_out_tokens": held_ids.numel()},
            "tokenizer": f"byte-level BPE (tokenizers), vocab {tok.get_vocab_size()}",
            "model": {"class": "LlamaForCausalLM", "parameters": params,
                      "config": model.config.to_diff_dict()},
            "training": {"steps": len(losses), "batch": args.batch, "seq": args.seq,
                         "tokens_seen": len(losses) * args.batch * args.seq, "lr": args.lr,
                         "threads": args.threads, "minutes": round(seconds / 60, 1),
                         "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)},
            "held_out_perplexity": round(ppl, 3)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(CACHE))
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=50.0,
                   help="stop training early after this long (the steps done are recorded)")
    p.add_argument("--force", action="store_true", help="rebuild even if the cache exists")
    return p.parse_args(argv)


def ensure(out: Path = CACHE) -> Path:
    """The cached model directory, building it with the default recipe if absent."""
    if not (out / "meta.json").exists():
        build(parse(["--out", str(out)]))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if (Path(args.out) / "meta.json").exists() and not args.force:
        print(f"cached: {args.out} (use --force to rebuild)")
        return
    print(json.dumps(build(args), indent=2))


if __name__ == "__main__":
    main()
