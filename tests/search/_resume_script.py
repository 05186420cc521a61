"""Run a journaled search (used by the resume test in a subprocess, then killed)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _toy import toy_data, toy_model, toy_space

from netpress.search import Size, search


@dataclass(frozen=True)
class SlowSize:
    """The artefact size, slowed down so the parent can kill the search mid-trial."""

    delay: float = 0.3
    name: str = "size"
    unit: str = "bytes"

    def measure(self, model: Any, recipe: Any, example_inputs: Any) -> float:
        time.sleep(self.delay)
        return Size().measure(model, recipe, example_inputs)


if __name__ == "__main__":
    journal, trials = sys.argv[1], int(sys.argv[2])
    model = toy_model()
    result = search(model, toy_space(model), objective=SlowSize(),
                    constraints=["agreement>=0.95"], trials=trials, strategy="tpe",
                    evaluate=toy_data(), chunk=100, journal=journal, progress=True)
    print(f"FINISHED {len(result.trials)}", flush=True)
