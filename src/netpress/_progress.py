"""Progress bars (rich) for steps that take more than a few seconds."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_enabled", "progress_bar"]


def progress_enabled(flag: bool | None) -> bool:
    """``flag`` if given, else whether stderr is a terminal."""
    return bool(flag) if flag is not None else sys.stderr.isatty()


@contextmanager
def progress_bar(
    total: int | None, description: str, enabled: bool
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; shows a transient rich bar when ``enabled``."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in fields.items())
            progress.update(task, advance=n, info=info)

        yield advance
