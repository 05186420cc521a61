"""all-MiniLM-L6-v2 compressed and run in ONNX Runtime: see _transformers_bench.py.

    .venv/bin/python benchmarks/transformers.py [--eval 512 ...]

This file is named like the ``transformers`` package and its folder is on ``sys.path`` when
any benchmark runs, so ``import transformers`` may find it: it then hands over the real
package instead of itself.
"""

import importlib
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _without_here() -> list[str]:
    return [p for p in sys.path if Path(p or ".").resolve() != _HERE]


if __name__ == "__main__":
    sys.path[:] = [*_without_here(), str(_HERE)]  # the real package first, helpers after it
    importlib.import_module("_transformers_bench").main()
else:  # imported as `transformers` by mistake: replace this module by the real package
    saved = sys.path[:]
    sys.path[:] = _without_here()
    del sys.modules[__name__]
    try:
        sys.modules[__name__] = importlib.import_module(__name__)
    finally:
        sys.path[:] = saved
