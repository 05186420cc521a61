"""Resuming a journaled search: a trial killed between its journaled outcome and
``study.tell`` is finished exactly once (told from the journal, not run again)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from netpress.search import search

from ._resume_script import SlowSize
from ._toy import toy_data, toy_model, toy_space

HERE = Path(__file__).parent


def _study(journal: Path) -> object:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="netpress-search",
                             storage=JournalStorage(JournalFileBackend(str(journal))))


def test_a_trial_killed_before_tell_is_finished_once_not_rerun(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    journal, target = tmp_path / "journal.log", 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(HERE / "_resume_script.py"), str(journal), str(target), "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert "KILLED before telling trial 2" in out.stdout
    killed = _study(journal).trials[2]  # type: ignore[attr-defined]
    assert killed.state == TrialState.RUNNING and "outcome" in killed.user_attrs
    objective = killed.user_attrs["outcome"]["objective"]

    model = toy_model()  # the same search as the script's, resumed in this process
    result = search(model, toy_space(model), objective=SlowSize(),
                    constraints=["agreement>=0.95"], trials=target, strategy="tpe",
                    evaluate=toy_data(), chunk=100, journal=journal)
    trials = _study(journal).trials  # type: ignore[attr-defined]
    finished = [t for t in trials if "outcome" in t.user_attrs]
    assert len(result.trials) == len(finished) == target  # the killed trial counts once
    again = trials[2]
    assert again.state in (TrialState.COMPLETE, TrialState.FAIL)
    assert again.user_attrs["outcome"]["objective"] == objective  # told, not re-measured
    if objective is not None:
        assert again.value == objective
    assert not [t for t in trials if t.user_attrs.get("requeued_from") == 2]  # not re-run
    assert sum(t.state == TrialState.RUNNING for t in trials) == 0
