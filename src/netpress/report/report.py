"""The :class:`Report`: reference vs compressed, with every metric netpress measured."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netpress._atomic import atomic_write
from netpress.errors import NetpressError

if TYPE_CHECKING:
    from torch import nn

    from netpress.config import Recipe
    from netpress.context import Context

__all__ = ["Report", "ReportWarning", "netpress_version"]


class ReportWarning(UserWarning):
    """A report's warning (e.g. a reference that scores near chance), also in ``warnings``."""


def netpress_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netpress")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class Report(Mapping[str, Any]):
    """A read-only mapping with the nested ``report.json`` content.

    Keys include ``reference``, ``compressed``, ``agreement``, ``fidelity``, ``size``,
    ``macs``, ``latency``, ``onnx`` (a quantized model measured in ONNX Runtime),
    ``warnings``, ``recipe`` and ``steps``; sections that could not be measured
    (no data given) are absent. ``thumbnails`` (not part of the mapping or of
    ``report.json``) maps flipped input indices to PNG bytes for the HTML page.
    """

    def __init__(self, data: Mapping[str, Any],
                 thumbnails: Mapping[int, bytes] | None = None) -> None:
        self._data = dict(data)
        self.thumbnails: dict[int, bytes] = dict(thumbnails or {})

    @classmethod
    def build(cls, reference: nn.Module, compressed: nn.Module, *, recipe: Recipe,
              ctx: Context, task: Any = None, measure: bool = True,
              latency_batch_size: int = 32, threads: int = 1,
              compress_seconds: float = 0.0, thumbnails: bool = True,
              sections: tuple[str, ...] = ()) -> Report:
        """Measure ``compressed`` against ``reference`` and assemble the report.

        Each of the report's ``warnings`` (e.g. a reference near chance) is also issued as
        a :class:`ReportWarning`. With ``thumbnails`` and image data, the first flipped
        evaluation inputs are kept as PNG thumbnails for :meth:`to_html` (one more pass over
        ``ctx.evaluate``, stopping after the last one needed).
        """
        data: dict[str, Any] = {
            "netpress_version": netpress_version(),
            "recipe": recipe.to_dict(),
            "steps": ctx.records,
            "timing": {"compress_seconds": round(compress_seconds, 3)},
        }
        if measure:
            from netpress.export import dumps_artefact
            from netpress.measure import compare

            artefact = len(dumps_artefact(compressed, recipe=recipe.to_dict()))
            data.update(compare(
                reference, compressed, data=ctx.evaluate, example_inputs=ctx.example_inputs,
                task=task, device=ctx.device, latency_batch_sizes=(1, latency_batch_size),
                threads=threads, artefact_bytes=artefact, progress=ctx.progress))
            from netpress.measure.sections import extra_sections  # split/activations/robustness

            data.update(extra_sections(reference, compressed, recipe=recipe,
                                       evaluate=ctx.evaluate, train=ctx.train,
                                       example_inputs=ctx.example_inputs, requested=sections,
                                       threads=threads))
        for text in data.get("warnings") or []:
            warnings.warn(text, ReportWarning, stacklevel=3)
        thumbs: dict[int, bytes] = {}
        flipped = (data.get("fidelity") or {}).get("flipped")
        if thumbnails and flipped and flipped.get("indices") and ctx.evaluate is not None:
            from netpress.report.html import thumbnails_for

            thumbs = thumbnails_for(ctx.evaluate, flipped["indices"])
        return cls(data, thumbs)

    # Mapping protocol -----------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self._data, indent=indent)

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """Read ``report.json`` (or a directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        if not p.is_file():
            raise NetpressError(f"no report at {str(p)!r}; run `netpress compress` or "
                                f"`netpress demo` with --out first")
        try:
            return cls(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise NetpressError(f"{p} is not a valid report.json: {exc}") from None

    def summary(self) -> dict[str, Any]:
        """The headline numbers (stored in the artefact's metadata)."""
        from netpress.report.render import headline

        return headline(self._data)

    def to_markdown(self) -> str:
        from netpress.report.render import to_markdown

        return to_markdown(self._data)

    def print(self, console: Any = None) -> None:
        """Print the summary table to the terminal (rich)."""
        from netpress.report.render import print_table

        print_table(self._data, console)

    def to_html(self, thumbnails: Mapping[int, bytes] | None = None) -> str:
        """The report as one self-contained HTML page with plots (plots need matplotlib).

        ``thumbnails`` (flipped input index → PNG bytes) defaults to :attr:`thumbnails`.
        """
        from netpress.report.html import to_html

        return to_html(self._data, thumbnails=self.thumbnails if thumbnails is None
                       else thumbnails)

    def write(self, directory: str | Path, *, html: bool = True,
              thumbnails: Mapping[int, bytes] | None = None) -> Path:
        """Write ``report.json``, ``report.md`` and (``html``) ``report.html`` atomically
        into ``directory``; returns the JSON path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "report.json", self.to_json())
        atomic_write(d / "report.md", self.to_markdown())
        if html:
            atomic_write(d / "report.html", self.to_html(thumbnails))
        return d / "report.json"


