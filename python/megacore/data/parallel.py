"""The embedded parallel corpus (Spanish–English Bible verses, public domain) and readers of parallel text.

``megacore/data/corpus/bible/bible_es_en.tsv.xz`` holds 31,077 verse pairs (provenance in the README next to it),
shipped as package data like the Austen novels, so that translation trains on a fresh machine with nothing to
download. The split holds out whole books: Ruth, Jonah and Philemon for validation, Mark and Esther for test, the
other 61 books for training.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from megacore.data.corpus import read_text

BIBLE_FILE = Path(__file__).resolve().parent / "corpus" / "bible" / "bible_es_en.tsv.xz"
LANGUAGES = ("es", "en")
VALID_BOOKS = ("Ruth", "Jonah", "Phlm")
TEST_BOOKS = ("Mark", "Esth")
SPLITS = ("train", "valid", "test", "all")
_HEADER = ("book", "chapter", "verse", "es", "en")


@dataclass(frozen=True)
class VersePair:
    """One aligned verse: where it is (book as in the KJV canon's OSIS abbreviations, chapter, verse) and its
    Spanish and English text."""

    book: str
    chapter: int
    verse: int
    es: str
    en: str


def read_bible_tsv(path: str | os.PathLike) -> list[VersePair]:
    """The verse pairs of a ``book chapter verse es en`` TSV (with that header line; xz-compressed or not), in file
    order. Raises ValueError naming the file and line for a wrong header, a row without five fields, a chapter or
    verse that is not a positive integer, or an empty side."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    where = f"megacore.data.read_bible_tsv: {path}"
    if not lines or tuple(lines[0].split("\t")) != _HEADER:
        raise ValueError(f"{where}, line 1: the header must be {' '.join(_HEADER)} (tab-separated)")
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 5:
            raise ValueError(f"{where}, line {number}: {len(fields)} tab-separated fields, expected 5 "
                             f"({' '.join(_HEADER)})")
        book, chapter, verse, es, en = fields
        if not (chapter.isdigit() and verse.isdigit() and int(chapter) > 0 and int(verse) > 0):
            raise ValueError(f"{where}, line {number}: chapter {chapter!r} and verse {verse!r} must be positive "
                             "integers")
        if not es.strip() or not en.strip():
            raise ValueError(f"{where}, line {number}: the {'es' if not es.strip() else 'en'} side is empty")
        pairs.append(VersePair(book, int(chapter), int(verse), es, en))
    return pairs


@functools.lru_cache(maxsize=1)
def _bible() -> tuple[VersePair, ...]:
    if not BIBLE_FILE.is_file():
        raise FileNotFoundError(f"megacore.data.bible_pairs: the embedded parallel corpus {BIBLE_FILE} is missing "
                                "(a broken installation: reinstall megacore)")
    return tuple(read_bible_tsv(BIBLE_FILE))


def bible_pairs(split: str = "train") -> list[VersePair]:
    """The embedded corpus's verse pairs of ``split``, in canonical order: ``"train"`` (61 books, 30,075 pairs),
    ``"valid"`` (Ruth, Jonah, Philemon: 157), ``"test"`` (Mark, Esther: 845) or ``"all"`` (31,077).

    Raises ValueError for an unknown split, FileNotFoundError when the package data is missing."""
    if split not in SPLITS:
        raise ValueError(f"megacore.data.bible_pairs: split must be one of {SPLITS}, got {split!r}")
    held_out = VALID_BOOKS + TEST_BOOKS
    keep = {"train": lambda b: b not in held_out, "valid": lambda b: b in VALID_BOOKS,
            "test": lambda b: b in TEST_BOOKS, "all": lambda b: True}[split]
    return [p for p in _bible() if keep(p.book)]


def bible_text(split: str = "train", language: str = "en") -> str:
    """One side of ``split``'s verses as plain text: a paragraph per chapter (chapters separated by a blank line),
    a line per verse; for monolingual data (``megacore prepare --document-unit paragraph``, tokenizer training).
    Raises ValueError for an unknown split or language."""
    if language not in LANGUAGES:
        raise ValueError(f"megacore.data.bible_text: language must be one of {LANGUAGES}, got {language!r}")
    chapters: list[list[str]] = []
    last = None
    for pair in bible_pairs(split):
        if (pair.book, pair.chapter) != last:
            chapters.append([])
            last = (pair.book, pair.chapter)
        chapters[-1].append(getattr(pair, language))
    return "\n\n".join("\n".join(verses) for verses in chapters) + "\n"


__all__ = ["BIBLE_FILE", "LANGUAGES", "SPLITS", "TEST_BOOKS", "VALID_BOOKS", "VersePair", "bible_pairs",
           "bible_text", "read_bible_tsv"]
