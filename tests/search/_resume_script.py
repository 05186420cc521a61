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


def kill_before_tell(k: int) -> None:
    """SIGKILL this process inside the k-th ``study.tell``: the trial's outcome is already in
    the journal (netpress records it first) but the study has not been told."""
    import os
    import signal

    import optuna

    tell = optuna.Study.tell
    calls = [0]

    def tell_or_die(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == k:
            print(f"KILLED before telling trial {k - 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return tell(self, *args, **kwargs)

    optuna.Study.tell = tell_or_die  # type: ignore[method-assign]


if __name__ == "__main__":
    journal, trials = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        kill_before_tell(int(sys.argv[3]))
    model = toy_model()
    result = search(model, toy_space(model), objective=SlowSize(),
                    constraints=["agreement>=0.95"], trials=trials, strategy="tpe",
                    evaluate=toy_data(), chunk=100, journal=journal, progress=True)
    print(f"FINISHED {len(result.trials)}", flush=True)
