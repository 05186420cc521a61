"""``npr.search`` on a sentence encoder: all-MiniLM-L6-v2, Wanda sparsity per block.

The 400 first documentation sentences of ``_transformers_bench.sentences()`` go through
``netpress.text_data.text_data`` (what ``--data text:FILE`` does: 320 to train and calibrate,
80 held out, batches of 32). The space is one Wanda sparsity per transformer block
(``0.0:0.5:0.05``, six knobs); the objective is the ``.npress`` size, the constraint
``cosine>=0.95`` (mean cosine of the held-out sentence embeddings, the sentence-embedding
task). For each strategy given (default ``tpe random``) a search of ``TRIALS`` (default 10)
trials runs, then its best recipe is applied again with ``npr.compress`` and re-measured by
the task on the held-out sentences. Prints one line per strategy.

    python benchmarks/search_text.py [TRIALS] [STRATEGY ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import netpress as npr
from netpress.config import Recipe
from netpress.models.hf import from_pretrained
from netpress.reconstruct.sparse import Wanda
from netpress.search import Range, RecipeSpace, Step, search
from netpress.search.objectives import Size


def main() -> None:
    from _transformers_bench import sentence_file_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trials", nargs="?", type=int, default=10, help="trials per search")
    p.add_argument("strategies", nargs="*", default=["tpe", "random"],
                   help="search strategies, each searched in turn (default: tpe random)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    trials, strategies = args.trials, args.strategies
    folder, data = sentence_file_data(400, batch_size=32)
    model = from_pretrained(folder)
    blocks = {rf"re:encoder\.layer\.{i}\..*": Range(0.0, 0.5, step=0.05) for i in range(6)}
    space = RecipeSpace([Step(Wanda, layers=(r"re:encoder\.layer\..*",), per_layer=blocks)])
    dense_size = Size().measure(model, Recipe(()), None)
    print(f"dense size {dense_size} bytes", flush=True)
    for strategy in strategies:
        started = time.perf_counter()
        result = search(model, space, objective="size", constraints=["cosine>=0.95"],
                        trials=trials, strategy=strategy, evaluate=data["evaluate"],
                        calibration=data["calibration"], task="sentence-embedding", seed=0)
        seconds = time.perf_counter() - started
        outcomes = [t["outcome"] for t in result.trials]
        print("  trials (size MB, cosine, state): " + "; ".join(
            f"{o['objective'] / 1e6:.2f} {o['constraints'][0]['value']:.3f} "
            f"{'ok' if o['feasible'] else 'stop' if o['early_stopped'] else 'no'}"
            for o in outcomes), flush=True)
        feasible = sum(o["feasible"] for o in outcomes)
        stopped = sum(o["early_stopped"] for o in outcomes)
        best = result.best_trial
        if best is None or result.best_recipe is None:
            print(f"{strategy}: no feasible trial of {trials} ({stopped} stopped early), "
                  f"{seconds:.0f} s", flush=True)
            continue
        again = npr.compress(model, result.best_recipe, calibration=data["calibration"],
                             evaluate=data["evaluate"], task="sentence-embedding")
        fid = again.report["fidelity"]
        sparsities = [round(v, 2) for _, v in sorted(best["params"].items())]
        print(f"{strategy}: best trial {best['number']} size {result.best_value:.0f} bytes "
              f"({result.best_value / dense_size:.3f} of dense), search cosine "
              f"{best['outcome']['constraints'][0]['value']:.4f}, re-measured cosine "
              f"{fid['cosine_mean']:.4f} (min {fid['cosine_min']:.4f}, retrieval "
              f"{fid['retrieval_agreement']:.4f}); {feasible}/{trials} feasible, {stopped} "
              f"stopped early; {seconds:.0f} s; block sparsities {sparsities}",
              flush=True)


if __name__ == "__main__":
    main()
