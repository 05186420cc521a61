"""Ad hoc (issue 13, thirteenth part): is the distilled student's remaining error a linear map
of its pooled embedding? Fits ``teacher ≈ [student, 1] @ A`` by ridge least squares on the
pooled embeddings of the first N training sentences (documentation + docstrings, none of the
256 selection or 512 held-out ones) and scores the mapped embeddings.

    .venv/bin/python benchmarks/results/lm_minilm_13r_linmap.py STUDENT.pt 6000

Output of the run recorded in BENCHMARKS.md: ``lm_minilm_13r_linmap.txt`` beside this file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from _transformers_bench import batches, embed, train_pool
from lm_minilm_refit import setup

from netpress.measure.text import retrieval_agreement

Map = Callable[[torch.Tensor], torch.Tensor]


def fit(student: torch.Tensor, teacher: torch.Tensor, lam: float) -> Map:
    """Ridge least squares of ``teacher`` on ``[student, 1]``, as a function of new rows."""
    x = torch.cat([student, torch.ones(len(student), 1)], 1).double()
    a = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype),
                           x.T @ teacher.double())
    return lambda z: (torch.cat([z, torch.ones(len(z), 1)], 1).double() @ a).float()


def report(name: str, student: torch.Tensor, teacher: torch.Tensor) -> str:
    c = F.cosine_similarity(student, teacher, dim=-1)
    return (f"{name}: cos {c.mean():.4f} / {c.min():.4f}, "
            f"retrieval {retrieval_agreement(teacher, student):.3f}")


def main() -> None:
    torch.set_num_threads(1)
    tok, model, texts, evaluate, ref = setup(512)
    student = torch.load(sys.argv[1], weights_only=False).eval()
    pool = train_pool(texts, "topics+docstrings", held_out=512 + 256)[:int(sys.argv[2])]
    train = batches(tok, pool, 64, pad="longest")
    select = batches(tok, texts[-768:-512], 32)
    started = time.time()
    t_train, s_train = embed(model, train), embed(student, train)
    s_eval = embed(student, evaluate)
    t_sel, s_sel = embed(model, select), embed(student, select)
    print("embedded", round(time.time() - started), "s", flush=True)
    print(report("eval, student", s_eval, ref))
    print(report("select, student", s_sel, t_sel))
    print(report("train, student", s_train, t_train))
    for lam in (1e-3, 1e-1, 1.0, 10.0):
        m = fit(s_train, t_train, lam)
        print(f"lam {lam}:", report("eval", m(s_eval), ref), "|",
              report("select", m(s_sel), t_sel), "|", report("train", m(s_train), t_train),
              flush=True)


if __name__ == "__main__":
    main()
