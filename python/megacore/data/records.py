"""Reading records from a user's text files: what ``read_pairs`` (seq2seq) and ``read_labeled`` (classification)
share, so that both tell a file's format, read it and report a bad line the same way.

Every error names the calling function (``fn``, e.g. ``"megacore.data.read_pairs"``), the file and, for a bad line,
its number counted from 1 in the file (blank lines included): ``megacore.data.read_pairs: data.jsonl:7: ...``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from megacore.data.corpus import read_text

__all__ = ["file_format", "json_object", "nonblank_lines", "read_file_text"]


def file_format(path: Path, formats: Mapping[str, Sequence[str]], fn: str, hint: str) -> str:
    """The format of ``path`` told by its name (an ``.xz`` suffix looked through): the key of ``formats`` (format ->
    name suffixes) whose suffixes end the name. Raises ValueError with ``hint`` (the formats in words) otherwise."""
    name = path.name[:-3] if path.name.endswith(".xz") else path.name
    for fmt, suffixes in formats.items():
        if name.endswith(tuple(suffixes)):
            return fmt
    raise ValueError(f"{fn}: {path}: cannot tell the format from the name: use {hint}")


def read_file_text(path: str | os.PathLike, fn: str) -> str:
    """The text of ``path`` (UTF-8, xz-compressed or not). Raises FileNotFoundError for a missing file and
    ValueError for text that is not UTF-8 or a corrupt xz stream."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: {path} does not exist or is not a file")
    try:
        return read_text(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{fn}: {path} is not UTF-8 text ({e})") from None


def nonblank_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number from 1, line)`` for the lines of ``text`` that are not blank, a trailing ``\\r`` dropped."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def json_object(line: str, where: str, fn: str) -> dict:
    """``line`` parsed as one JSON object. Raises ValueError naming ``where`` (``file:line``) for bad JSON or a value
    that is not an object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn}: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{fn}: {where}: expected a JSON object, got {type(record).__name__}")
    return record
