"""Write a benchmark's table into its page of ``docs/results/``.

A page marks each table that a script owns with a pair of HTML comments, invisible once rendered:

    <!-- begin: fitymi_classes animals -->
    ...the command that made the table, then the table...
    <!-- end: fitymi_classes animals -->

:func:`replace_block` rewrites what lies between the two markers and leaves every other byte of the page as it was,
so the text around a table (what it shows) is written by hand and survives a refresh. :func:`table` is the one
markdown-table formatter of the scripts, and :func:`block` puts the command above the table. A script with a
``--doc`` option calls :func:`write_doc` at its end. (Named ``docpage``, not ``docs``, so that it is never
confused with the repository's ``docs/`` folder on ``sys.path``.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterable, Sequence

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"


def _markers(name: str) -> tuple[str, str]:
    if not name or "-->" in name or "\n" in name:
        raise ValueError(f"not a block name: {name!r}")
    return f"<!-- begin: {name} -->", f"<!-- end: {name} -->"


def replace_block(path: str | Path, name: str, text: str) -> None:
    """Replace the lines between ``<!-- begin: name -->`` and ``<!-- end: name -->`` in ``path`` by ``text``.

    The markers stay; the rest of the page is not touched. A page without the pair, or with it twice, is an error
    (a block is never appended silently where nobody would look for it)."""
    path = Path(path)
    page = path.read_text()
    begin, end = _markers(name)
    pattern = re.compile(rf"^{re.escape(begin)}[ \t]*\n.*?^{re.escape(end)}[ \t]*$", re.S | re.M)
    found = pattern.findall(page)
    if len(found) != 1:
        raise ValueError(f"{path}: expected one block {begin} ... {end}, found {len(found)}")
    body = text.strip("\n")
    new = f"{begin}\n{body}\n{end}" if body else f"{begin}\n{end}"
    path.write_text(pattern.sub(lambda _: new, page, count=1))


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; cells are written as given (format numbers before), ``None`` as an empty cell, and ``|``
    inside a cell is escaped."""

    def cell(value: object) -> str:
        return "" if value is None else str(value).replace("|", r"\|")

    def line(cells: Iterable[object]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in map(cell, cells)) + "|"  # an empty cell is "| |"

    return "\n".join([line(header), "|---" * len(header) + "|", *(line(row) for row in rows)])


def command(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<script> <args>``: the arguments the script ran with, without ``--doc`` and its value."""
    args, skip = [], False
    for arg in list(argv or []):
        if skip:
            skip = False
            continue
        if arg == "--doc":
            skip = True
            continue
        if arg.startswith("--doc="):
            continue
        args.append(arg)
    words = ["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)]
    lines, line = [], words[0]
    for word in words[1:]:  # wrapped with a backslash before 116 characters, options starting a line where they can
        if len(line) + 1 + len(word) > 114 or (word.startswith("--") and len(line) > 80):
            lines.append(line + " \\")
            line = "    " + word
        else:
            line += " " + word
    return "\n".join([*lines, line])


def block(cmd: str, body: str, note: str = "") -> str:
    """The text of a block: the command in a bash fence, an optional line (settings, device), the table."""
    parts = ["```bash", cmd, "```", ""]
    if note:
        parts += [note, ""]
    return "\n".join(parts + [body.strip("\n")])


def write_doc(page: str | Path, name: str, script: str, argv: Sequence[str] | None, body: str,
              note: str = "") -> Path:
    """Refresh block ``name`` of ``page`` (a path, or a file name under ``docs/results/``) with the command of this
    run and ``body``; returns the page's path."""
    path = Path(page)
    if not path.is_file() and not path.is_absolute() and (DOCS / path).is_file():
        path = DOCS / path
    replace_block(path, name, block(command(script, argv), body, note))
    return path


def size(n_bytes: float) -> str:
    """Bytes for a reader: ``160 KB``, ``524 MB``, ``3.33 GB`` (decimal units)."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.2f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e3:.0f} KB"
