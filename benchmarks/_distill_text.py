"""More (and more varied) distillation text that ships on this machine, for the MiniLM
distillation benchmarks: the docstrings of every installed package (the interpreter's
site-packages, parsed with ``ast``, nothing imported), the text files under
``/usr/share/doc`` (READMEs, NEWS, changelogs, ``.txt`` / ``.md``, gzipped or not), the
English manual pages (roff markup stripped) and ``/usr/share/common-licenses``.

Everything is split into sentences with the rules of the documentation sentences (6-40 words,
starting with a letter), deduplicated, capped per file (a long changelog does not dominate),
and any sentence *near* an excluded one (the held-out evaluation sentences) is dropped: same
words ignoring case and punctuation, or any 8-word run in common. The result is cached as a
text file (``~/.cache/netpress/distill_text_<digest>.txt``; the digest covers the excluded
sentences and :data:`VERSION`), so only the first call parses the files (~1-3 min).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

VERSION = 1
PER_FILE = 200  # at most this many sentences from one file
SHINGLE = 8  # words: a run this long in common with an excluded sentence makes a sentence near
SKIP_DIRS = {"test", "tests", "testing", "__pycache__", "idle_test", "_vendor", "vendored"}
DOC_NAMES = re.compile(r"(readme|news|changelog|changes|history|copyright|authors|"
                       r"\.txt|\.md|\.rst)(\.gz)?$", re.I)
ROFF = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[-&e|^ ]|\\s[-+]?\d")


def words(s: str) -> list[str]:
    """Lowercased words of ``s`` (letters and digits), for nearness tests."""
    return re.findall(r"[a-z0-9]+", s.lower())


def shingles(s: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    """The ``n``-word runs of ``s`` (the whole word list when shorter)."""
    w = words(s)
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of ``text`` (whitespace collapsed) with 6-40 words that start with a letter
    and are not list, table or doctest lines."""
    for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        s = s.strip()
        if 6 <= len(s.split()) <= 40 and s[:1].isalpha() and not s.startswith(">>>"):
            yield s


def _docstrings(root: Path) -> Iterator[tuple[str, str]]:
    for f in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(f.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        doc = [ast.get_docstring(n) or "" for n in ast.walk(tree)
               if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef))]
        yield str(f), "\n".join(doc)


def _read(f: Path) -> str:
    data = f.read_bytes()
    if f.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return ""
    return data.decode("utf-8", errors="ignore")


def _docs(root: Path) -> Iterator[tuple[str, str]]:
    for f in sorted(root.rglob("*")):
        if f.is_file() and not f.is_symlink() and DOC_NAMES.search(f.name):
            yield str(f), _read(f)


def _roff(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):  # requests and macros; keep the text of .B/.I
            m = re.match(r"^\.(B|I|BR|IR|RB|RI|BI|IB|SM)\s+(.*)$", line)
            line = m.group(2).replace('"', "") if m else ""
        lines.append(ROFF.sub("", line))
    return "\n".join(lines)


def _manpages(root: Path) -> Iterator[tuple[str, str]]:
    for f in sorted(root.glob("man[1-8]/*")):
        if f.is_file() and not f.is_symlink():
            yield str(f), _roff(_read(f))


def sources() -> Iterator[tuple[str, str]]:
    """``(file, text)`` of every source, in a fixed order."""
    yield from _docstrings(Path(sysconfig.get_paths()["purelib"]))
    yield from _docs(Path("/usr/share/doc"))
    yield from _manpages(Path("/usr/share/man"))
    yield from _docs(Path("/usr/share/common-licenses"))


def collect(files: Iterable[tuple[str, str]], exclude: Iterable[str]) -> list[str]:
    """Sentences of ``files`` (at most :data:`PER_FILE` each), deduplicated by their words,
    none near an ``exclude`` sentence (same words, or an :data:`SHINGLE`-word run in
    common), shuffled deterministically."""
    exclude = list(exclude)
    banned = {tuple(words(s)) for s in exclude}
    runs: set[tuple[str, ...]] = set().union(*(shingles(s) for s in exclude)) if exclude else set()
    seen: set[tuple[str, ...]] = set()
    out: list[str] = []
    for _, text in files:
        taken = 0
        for s in split_sentences(text):
            key = tuple(words(s))
            if key in seen or key in banned or shingles(s) & runs:
                continue
            seen.add(key)
            out.append(s)
            taken += 1
            if taken >= PER_FILE:
                break
    random.Random(3).shuffle(out)
    return out


def machine_sentences(exclude: Iterable[str]) -> list[str]:
    """:func:`collect` over :func:`sources`, cached (see the module docstring)."""
    exclude = sorted(set(exclude))
    digest = hashlib.sha1(("\n".join(exclude) + f"\n{VERSION}").encode()).hexdigest()[:12]
    cache = Path.home() / ".cache" / "netpress" / f"distill_text_{digest}.txt"
    if cache.exists():
        return cache.read_text(encoding="utf-8").split("\n")
    out = collect(sources(), exclude)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("\n".join(out), encoding="utf-8")
    return out
