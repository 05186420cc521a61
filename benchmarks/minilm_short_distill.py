"""A short Distill after FisherPrune on all-MiniLM-L6-v2, as a command-line user would run it.

The 400 first documentation sentences of ``_transformers_bench.sentences()`` go through
``netpress.text_data.text_data`` (what ``--data text:FILE`` does: 320 to train and calibrate,
80 held out, batches of 32), ``FisherPrune(macs=0.5)`` once, then each ``Distill`` setting
given as JSON (name -> keyword arguments) from that pruned model. Prints the held-out
cosine, retrieval agreement and final loss per setting.

    python benchmarks/minilm_short_distill.py '{"default": {"max_steps": 20}}'
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import netpress as npr
from netpress.models.hf import from_pretrained


def main() -> None:
    from _transformers_bench import sentence_file_data

    warnings.simplefilter("ignore")
    folder, data = sentence_file_data(400, batch_size=32)
    model = from_pretrained(folder)
    pruned = npr.compress(model, [npr.FisherPrune(macs=0.5)], calibration=data["calibration"],
                          evaluate=data["evaluate"], task="sentence-embedding")
    print("pruned", round(pruned.report["fidelity"]["cosine_mean"], 4), flush=True)
    for name, kwargs in json.loads(sys.argv[1]).items():
        res = npr.compress(pruned.model, [npr.Distill(**kwargs)], reference=model,
                           train=data["train"], evaluate=data["evaluate"],
                           task="sentence-embedding")
        fid, step = res.report["fidelity"], res.report["steps"][-1]
        print(name, round(fid["cosine_mean"], 4), round(fid["retrieval_agreement"], 4),
              step.get("final_loss"), step.get("loss"), flush=True)


if __name__ == "__main__":
    main()
