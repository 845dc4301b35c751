"""Fine-tuning data for classifiers: labelled texts (a class, a number, or a tag per word), read from a user's files
or built from the embedded corpora, and the dataset a ``megacore.models.Classifier`` trains on.

**User files** (:func:`read_labeled`): ``.jsonl`` / ``.json`` (one JSON object per line), ``.csv`` (comma-separated,
RFC 4180 quoting, read with Python's ``csv`` module) or ``.tsv`` (tab-separated, no quoting: a ``"`` is text, as
GLUE's files need), optionally ``.xz``-compressed. CSV and TSV files start with a header row naming the columns.
The text is under ``text_key``, the label under ``label_key``, an optional second text under ``pair_key`` (a file
has it on every row or on none). Labels are class names or numbers, kept as given (a CSV cell is always text;
:class:`LabelSet` and :func:`encode_examples` read ``"1"`` and ``1`` alike). JSON lines may also hold a tagging
example: a list of words under ``text_key`` and a list of as many tags under ``label_key`` (Hugging Face's
``tokens`` / ``ner_tags`` layout). Every bad row (bad JSON, a missing key or column, an empty text or label, a
label that is neither text nor a number, a row of the wrong width, bad CSV quoting) is a ValueError naming
``file:line``; a file without any example is one too. Blank lines are skipped.

**The embedded tasks** are built from the package's corpora, deterministically (no random draw but from a fixed
seed), and cached in the process:

* ``austen-novel`` (:func:`austen_novel_examples`): which of Austen's six novels a passage comes from; the label
  is the novel's title. The novels are cut into chapters at their ``CHAPTER n`` headings (numbered 1, 2, ...
  through the whole book: *Emma*'s three volumes run on, its chapter 19 is volume II's first); the front matter,
  editorial notes (``[...]``), footnotes and ``* * *`` separators and the matter after ``THE END`` / ``FINIS``
  (*Northanger Abbey*'s note on the text) are dropped. The editions' typography is made one, so that the writing
  tells the novel and not its typesetting: the underscores of italics are removed and *Persuasion*'s ``Mr`` /
  ``Mrs`` get the period the others print. A chapter's paragraphs are split into sentences
  (:func:`megacore.data.split_sentences`) and the sentences, across paragraphs, into passages: consecutive
  sentences until the passage holds :data:`PASSAGE_SENTENCES` (3) of them or :data:`PASSAGE_WORDS` (50) words
  (the chapter's last passage may be shorter; one long sentence is a passage alone: median 55 words, 99th
  percentile 135). Whole chapters are held out: chapter 10, 20, 30, ... of each novel is ``"valid"``, chapter 11,
  21, 31, ... ``"test"``, every other chapter ``"train"`` (220, 25 and 24 of the 269 chapters), so no evaluation
  passage shares a chapter with a training one. The training split keeps every passage (the novels' sizes
  differ: *Emma* 2,374, *Northanger Abbey* 1,104); the evaluation splits are balanced, each novel down-sampled
  to the rarest novel's count (passages evenly spaced through the novel's held-out chapters), so chance is 1/6.
  The pretraining corpus holds *Persuasion* out; this task uses all six.
* ``bible-pair`` (:func:`bible_pair_examples`): is the English verse the translation of the Spanish one? Every
  verse pair of :func:`megacore.data.bible_pairs`'s split (whole books held out) gives two examples, in
  canonical order: the Spanish verse with its English verse (``"translation"``) and with another English verse
  (``"mismatch"``), so the classes are balanced 50/50. The mismatched verse is, for every other verse (the even
  positions of the split), a nearby one: two or three verses before or after in the same chapter (hard: the same
  story and names), for the others a verse of another chapter of the split drawn at random (easy). Distance 1 is
  never used: a few chapters of the corpus are shifted by one verse (its README), where the neighbour is the
  true translation; there the ``"translation"`` example is off by one, noise left as the corpus has it.
  Draws come from ``numpy.random.default_rng(BIBLE_PAIR_SEED)``, in order. A mismatch never has the true
  verse's English text.
* ``proper-nouns`` (:func:`proper_noun_examples`): tagging. The passages of ``austen-novel`` (the same chapter
  split, every passage, not balanced) as words, each tagged ``"NAME"`` (a proper noun) or ``"O"``. Words are
  runs of letters and digits with their apostrophes (``Darcy's``, ``don't``), the titles ``Mr.`` ``Mrs.``
  ``Dr.`` ``St.`` ``Messrs.`` with their period, dashes, or single punctuation marks. The rule: a capitalised
  word *mid-sentence* (after a word or a comma in its sentence) is a proper noun; at other places (a sentence's
  first word, after an opening quote, a dash, a colon, ...) capitals say nothing, so a word there is a proper
  noun when its word type (lower-cased, without a possessive ``'s``) is capitalised in at least 90% of its
  mid-sentence occurrences across the six novels, and in at least two of them (the *lexicon*: ``Emma``,
  ``Frank``, ``God`` are in it; ``Long``, ``Park``, ``Street`` are not). Never names: ``I`` (and ``I'm``,
  ``I'll``, ...), the interjection ``O``, and titles (:data:`TITLES`: ``Mr.``, ``Miss``, ``Sir``, ``Lady``,
  ``Colonel``, ...: in ``Lady Catherine`` only ``Catherine`` is a name, as in CoNLL's entities). Words in capitals
  (``NOT``) go by the lexicon. Months, days, places, houses and book titles capitalised mid-sentence are names
  too (they are proper nouns); capitalised lines of verse are the rule's known noise. WordPiece lower-cases, so
  a model must find names from context and from knowing them: that is the task.

**Encoding** (:func:`encode_examples`): a tokenizer with ``cls`` and ``sep`` (WordPiece: BERT, ELECTRA) gives
``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``, token types 0 up to the first ``[SEP]`` and 1 after it; one without
(byte-level BPE: GPT; a Unigram) gives ``a eod`` or ``a eod b eod``, token types all 0 (GPT-2's token types would
index its word embeddings). A tagging example is encoded word by word, as transformers' ``word_ids`` alignment
does: each word's pieces, its tag on the first piece and -100 on the others, on special tokens and on padding (and
on a second text). For tokenizers that see spaces (not WordPiece) a word gets a leading space where ``text`` has
one before it, so the pieces are those of the text (but where the text runs punctuation marks together, ``."``:
those are words of their own here). Too long without ``truncation``: ValueError naming the example; with it,
tokens are cut from the end of the longer text first (Hugging Face's ``"longest_first"``, as the ``tokenizers``
library and so transformers' fast tokenizers do it).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megacore.data.corpus import NOVELS, corpus_files, read_text
from megacore.data.masked_lm import IGNORE_INDEX, _is_int
from megacore.data.parallel import bible_pairs
from megacore.data.prepare import split_sentences
from megacore.data.records import file_format, json_object, nonblank_lines, read_file_text

__all__ = [
    "BIBLE_PAIR_LABELS", "ClassificationDataset", "LabelSet", "LabeledExample", "NOVEL_TITLES", "PROPER_NOUN_TAGS",
    "SPLITS", "TITLES", "austen_novel_examples", "bible_pair_examples", "chapter_split", "encode_examples",
    "label_counts", "majority_baseline", "proper_noun_examples", "read_labeled",
]

SPLITS = ("train", "valid", "test")
NOVEL_TITLES = {
    "emma": "Emma", "mansfield_park": "Mansfield Park", "northanger_abbey": "Northanger Abbey",
    "persuasion": "Persuasion", "pride_and_prejudice": "Pride and Prejudice",
    "sense_and_sensibility": "Sense and Sensibility",
}
PASSAGE_SENTENCES = 3
PASSAGE_WORDS = 50
BIBLE_PAIR_LABELS = ("mismatch", "translation")
BIBLE_PAIR_SEED = 1909  # the Reina-Valera's year
PROPER_NOUN_TAGS = ("NAME", "O")
#: Titles before a name; never tagged NAME themselves (compared lower-cased).
TITLES = frozenset(
    "mr. mrs. dr. st. messrs. miss ms master sir lady lord dame rev colonel captain admiral general major "
    "lieutenant madam madame mademoiselle".split())
LEXICON_SHARE = 0.9
LEXICON_MIN_COUNT = 2


@dataclass(frozen=True)
class LabeledExample:
    """A text (or a text pair) and its label: a class name, a number (regression) or, for tagging, one tag per word
    of ``words``. ``where`` says where it came from (``"file:line"``, ``"Emma, chapter 12, passage 3"``,
    ``"Mark 3:4"``), for messages."""

    text: str
    label: Union[str, float, tuple]
    text_pair: Optional[str] = None
    words: Optional[tuple] = None
    where: str = ""


# ---- user files -----------------------------------------------------------------------------------------------

_READ = "megacore.data.read_labeled"
_FORMATS = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "tsv": (".tsv",)}
_FORMAT_HINT = ".jsonl / .json (JSON lines), .csv or .tsv (with a header row), optionally .xz"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_label(value, where: str, key: str):
    """A label as given (a non-empty str or a finite number), else ValueError naming ``where``."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{_READ}: {where}: the {key!r} label is empty")
        return value
    if _is_number(value):
        if not math.isfinite(value):
            raise ValueError(f"{_READ}: {where}: the {key!r} label is {value}, expected a finite number")
        return value
    kind = "null" if value is None else type(value).__name__
    raise ValueError(f"{_READ}: {where}: the {key!r} label is a {kind}, expected a class name or a number")


def _check_text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_READ}: {where}: field {key!r} is a {type(value).__name__}, expected text")
    if not value.strip():
        raise ValueError(f"{_READ}: {where}: the {key!r} text is empty")
    return value


def _json_example(record: dict, where: str, text_key: str, pair_key: Optional[str], label_key: str):
    """(text, label, pair or None, words or None) of one JSON line."""
    for key in (text_key, label_key):
        if key not in record:
            raise ValueError(f"{_READ}: {where}: no field {key!r} (fields: {', '.join(sorted(record)) or 'none'}; "
                             "pick them with --text-key / --label-key)")
    text, label = record[text_key], record[label_key]
    pair = record.get(pair_key) if pair_key else None
    pair = None if pair is None else _check_text(pair, where, pair_key)
    if isinstance(text, list) or isinstance(label, list):  # tagging: words and their tags
        if not (isinstance(text, list) and isinstance(label, list)):
            raise ValueError(f"{_READ}: {where}: a tagging example needs a list of words under {text_key!r} and a "
                             f"list of tags under {label_key!r}, got a {type(text).__name__} and a "
                             f"{type(label).__name__}")
        if not text:
            raise ValueError(f"{_READ}: {where}: the {text_key!r} word list is empty")
        if len(text) != len(label):
            raise ValueError(f"{_READ}: {where}: {len(text)} words under {text_key!r} but {len(label)} tags under "
                             f"{label_key!r}")
        words = tuple(_check_text(w, f"{where}: word {i}", text_key) for i, w in enumerate(text))
        tags = tuple(_check_label(t, f"{where}: tag {i}", label_key) for i, t in enumerate(label))
        return " ".join(words), tags, pair, words
    return _check_text(text, where, text_key), _check_label(label, where, label_key), pair, None


def _table_rows(text: str, fmt: str, path: Path):
    """``(line number, fields)`` of a CSV / TSV text's non-blank rows; a row's number is the line it starts on."""
    dialect = {"delimiter": ","} if fmt == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, **dialect)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{_READ}: {path}:{start}: bad {fmt.upper()} row ({e})") from None
        if any(f.strip() for f in fields):
            yield start, fields
        start = reader.line_num + 1


def read_labeled(path: str | os.PathLike, text_key: str = "text", pair_key: Optional[str] = "text_pair",
                 label_key: str = "label") -> list[LabeledExample]:
    """The labelled examples of a JSONL, CSV or TSV file, in file order (formats and rules in the module
    docstring); ``where`` is ``file:line``. ``pair_key`` None: no second text even where the file has one.

    Raises FileNotFoundError for a missing file, ValueError naming ``file:line`` for a bad row and ValueError for a
    file without examples or a name whose format is unknown."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{_READ}: {path} does not exist or is not a file")
    for name, key in (("text_key", text_key), ("label_key", label_key), ("pair_key", pair_key)):
        if not (isinstance(key, str) and key) and not (name == "pair_key" and key is None):
            raise ValueError(f"{_READ}: {name}={key!r} must be a non-empty str")
    fmt = file_format(path, _FORMATS, _READ, _FORMAT_HINT)
    text = read_file_text(path, _READ)
    examples: list[LabeledExample] = []
    has_pair: Optional[bool] = None  # decided by the first example
    if fmt == "jsonl":
        rows = ((number, json_object(line, f"{path}:{number}", _READ)) for number, line in nonblank_lines(text))
    else:
        rows = _table_rows(text, fmt, path)
        try:
            header_line, header = next(rows)
        except StopIteration:
            raise ValueError(f"{_READ}: {path} holds no examples (not even a header row)") from None
        for key in (text_key, label_key):
            if header.count(key) != 1:
                problem = "has no column" if key not in header else "names twice the column"
                raise ValueError(f"{_READ}: {path}:{header_line}: the header {header} {problem} {key!r} (a "
                                 f"{fmt.upper()} file starts with a header row naming its columns; pick them with "
                                 "--text-key / --label-key)")
        columns = {k: header.index(k) for k in (text_key, label_key, pair_key) if k is not None and k in header}
        rows = ((number, fields, columns, len(header)) for number, fields in rows)
    for row in rows:
        number = row[0]
        where = f"{path}:{number}"
        if fmt == "jsonl":
            text_, label, pair, words = _json_example(row[1], where, text_key, pair_key, label_key)
        else:
            fields, columns, width = row[1], row[2], row[3]
            if len(fields) != width:
                raise ValueError(f"{_READ}: {where}: {len(fields)} {'comma' if fmt == 'csv' else 'tab'}-separated "
                                 f"fields, the header has {width}")
            text_ = _check_text(fields[columns[text_key]], where, text_key)
            label = _check_label(fields[columns[label_key]], where, label_key)
            pair = _check_text(fields[columns[pair_key]], where, pair_key) if pair_key in columns else None
            words = None
        if has_pair is None:
            has_pair = pair is not None
        elif has_pair != (pair is not None):
            raise ValueError(f"{_READ}: {where}: {'no' if has_pair else 'a'} {pair_key!r} text, unlike the rows "
                             "before it (a file has a second text on every row or on none)")
        examples.append(LabeledExample(text_, label, pair, words, where))
    if not examples:
        raise ValueError(f"{_READ}: {path} holds no examples")
    return examples


# ---- labels ---------------------------------------------------------------------------------------------------


def _label_name(label) -> str:
    """A label's name: a str as it is, a number as its shortest text (``1``, ``1.0`` -> ``"1"``; ``0.5``)."""
    if isinstance(label, str):
        return label
    if _is_number(label):
        value = float(label)
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"a label must be a str or a number, got {type(label).__name__}")


def _number(label) -> Optional[float]:
    """The number a regression label is (a number, or text that reads as one), else None."""
    if _is_number(label):
        return float(label)
    if isinstance(label, str):
        try:
            return float(label)
        except ValueError:
            return None
    return None


def _labels_of(example: LabeledExample) -> tuple:
    return example.label if isinstance(example.label, tuple) else (example.label,)


@dataclass
class LabelSet:
    """Label ids: ``names[i]`` is the name of id ``i``. A regression LabelSet has no names (``num_labels`` 1).

    Numbers and numeric text name the same class (``1``, ``1.0`` and ``"1"`` are ``"1"``)."""

    names: list = field(default_factory=list)
    regression: bool = False

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"megacore.data.LabelSet: names {self.names} are not unique")
        if self.regression and self.names:
            raise ValueError("megacore.data.LabelSet: a regression LabelSet has no names")
        if not self.regression and not self.names:
            raise ValueError("megacore.data.LabelSet: a classification LabelSet needs at least one name")
        self._ids = {n: i for i, n in enumerate(self.names)}

    @property
    def num_labels(self) -> int:
        """The classifier's output size: the number of names, 1 for regression."""
        return 1 if self.regression else len(self.names)

    @classmethod
    def from_examples(cls, examples: Sequence[LabeledExample], regression: bool = False) -> "LabelSet":
        """The labels of ``examples`` (tags too), sorted: by value when every name is a number, else as text.
        ``regression``: checks that every label is a number (or numeric text) and returns a regression LabelSet.

        Raises ValueError for no examples, a label that is not a str or a number (naming the example's
        ``where``), and with ``regression`` for a label that is not a number or a tagging example."""
        fn = "megacore.data.LabelSet.from_examples"
        if not examples:
            raise ValueError(f"{fn}: no examples")
        names = set()
        for e in examples:
            if regression:
                if isinstance(e.label, tuple) or _number(e.label) is None or not math.isfinite(_number(e.label)):
                    raise ValueError(f"{fn}: {e.where}: label {e.label!r} is not a number (regression)")
                continue
            for label in _labels_of(e):
                try:
                    names.add(_label_name(label))
                except ValueError as err:
                    raise ValueError(f"{fn}: {e.where}: {err}") from None
        if regression:
            return cls([], regression=True)
        try:
            ordered = sorted(names, key=float)
        except ValueError:
            ordered = sorted(names)
        return cls(ordered)

    def id(self, label, where: str = "") -> int:
        """The id of ``label`` (a name, or a number). Raises ValueError naming ``where`` for a label not in the set."""
        try:
            name = _label_name(label)
        except ValueError:
            name = None
        if name not in self._ids:
            shown = ", ".join(self.names[:20]) + (", ..." if len(self.names) > 20 else "")
            raise ValueError(f"megacore.data.LabelSet.id: {where + ': ' if where else ''}label {label!r} is not one of "
                             f"the {len(self.names)} labels ({shown})")
        return self._ids[name]


def label_counts(examples: Sequence[LabeledExample]) -> dict:
    """``{label name: count}`` of ``examples``, most common first (ties by name); a tagging example counts each
    tag. Raises ValueError for no examples."""
    if not examples:
        raise ValueError("megacore.data.label_counts: no examples")
    counts = Counter(_label_name(label) for e in examples for label in _labels_of(e))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def majority_baseline(examples: Sequence[LabeledExample]) -> float:
    """The accuracy of always predicting the most common label of ``examples`` (for tagging, the most common
    tag, per word): the "chance" to report next to a classifier's accuracy. Raises ValueError for no examples."""
    counts = label_counts(examples)
    return max(counts.values()) / sum(counts.values())


# ---- the embedded tasks ---------------------------------------------------------------------------------------


def _check_split(split: str, fn: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"megacore.data.{fn}: split must be one of {SPLITS}, got {split!r}")


def chapter_split(chapter: int) -> str:
    """Which split a novel's ``chapter`` (numbered from 1) belongs to: 10, 20, ... ``"valid"``; 11, 21, ...
    ``"test"``; the others ``"train"``."""
    if chapter % 10 == 0:
        return "valid"
    if chapter % 10 == 1 and chapter > 1:
        return "test"
    return "train"


_CHAPTER_HEADING = re.compile(r"(?:CHAPTER|Chapter)\s+(?:[IVXLC]+|\d+)\.?")
_BOOK_END = frozenset({"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"})
_UNDOTTED_TITLE = re.compile(r"\b(Mrs?|Dr|Messrs)\b(?!\.)")


@functools.lru_cache(maxsize=None)
def _chapters(novel: str) -> tuple[tuple[str, ...], ...]:
    """A novel's chapters, each its sentences (module docstring: what is dropped and made one)."""
    path = next(p for p in corpus_files("all") if p.name.startswith(novel + "."))
    chapters: list[list[str]] = []
    for paragraph in re.split(r"\n[ \t]*\n", read_text(path)):
        paragraph = " ".join(paragraph.replace("_", "").split())
        if not paragraph:
            continue
        if _CHAPTER_HEADING.fullmatch(paragraph):
            chapters.append([])
        elif paragraph in _BOOK_END:
            break
        elif chapters and not paragraph.startswith(("[", "*", "VOLUME")):
            chapters[-1].extend(split_sentences(_UNDOTTED_TITLE.sub(r"\1.", paragraph)))
    return tuple(tuple(c) for c in chapters)


@functools.lru_cache(maxsize=None)
def _passages(split: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """``(novel, where, sentences)`` of every passage of ``split``'s chapters, in novel and text order."""
    out = []
    for novel in NOVELS:
        for number, sentences in enumerate(_chapters(novel), start=1):
            if chapter_split(number) != split:
                continue
            passages, current, words = [], [], 0
            for sentence in sentences:
                current.append(sentence)
                words += len(sentence.split())
                if len(current) >= PASSAGE_SENTENCES or words >= PASSAGE_WORDS:
                    passages.append(tuple(current))
                    current, words = [], 0
            if current:
                passages.append(tuple(current))
            title = NOVEL_TITLES[novel]
            out += [(novel, f"{title}, chapter {number}, passage {i}", p) for i, p in enumerate(passages, start=1)]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _austen_novel(split: str) -> tuple[LabeledExample, ...]:
    by_novel = {n: [LabeledExample(" ".join(s), NOVEL_TITLES[n], where=w) for novel, w, s in _passages(split)
                    if novel == n] for n in NOVELS}
    if split != "train":  # balanced: each novel's held-out passages, evenly spaced, down to the rarest's count
        m = min(len(v) for v in by_novel.values())
        by_novel = {n: [v[i * len(v) // m] for i in range(m)] for n, v in by_novel.items()}
    return tuple(e for n in NOVELS for e in by_novel[n])


def austen_novel_examples(split: str) -> list[LabeledExample]:
    """The ``austen-novel`` task's examples of ``split`` (``"train"``, ``"valid"``, ``"test"``): a passage of a few
    sentences, labelled with its novel's title (:data:`NOVEL_TITLES`); whole chapters held out, evaluation splits
    balanced (module docstring). Raises ValueError for an unknown split."""
    _check_split(split, "austen_novel_examples")
    return list(_austen_novel(split))


@functools.lru_cache(maxsize=None)
def _bible_pairs(split: str) -> tuple[LabeledExample, ...]:
    pairs = bible_pairs(split)
    rng = np.random.default_rng(BIBLE_PAIR_SEED)
    chapter = [(p.book, p.chapter) for p in pairs]
    out = []
    for i, p in enumerate(pairs):
        where = f"{p.book} {p.chapter}:{p.verse}"
        near = [j for j in (i - 3, i - 2, i + 2, i + 3)
                if 0 <= j < len(pairs) and chapter[j] == chapter[i] and pairs[j].en != p.en]
        if i % 2 == 0 and near:
            j = near[int(rng.integers(len(near)))]
        else:
            while True:  # any verse of another chapter (every split holds several chapters)
                j = int(rng.integers(len(pairs)))
                if chapter[j] != chapter[i] and pairs[j].en != p.en:
                    break
        q = pairs[j]
        out.append(LabeledExample(p.es, "translation", p.en, where=where))
        out.append(LabeledExample(p.es, "mismatch", q.en, where=f"{where} with the English of {q.book} {q.chapter}:"
                                                                 f"{q.verse}"))
    return tuple(out)


def bible_pair_examples(split: str) -> list[LabeledExample]:
    """The ``bible-pair`` task's examples of ``split``: ``text`` a Spanish verse, ``text_pair`` an English one,
    ``"translation"`` or ``"mismatch"`` (:data:`BIBLE_PAIR_LABELS`), two per verse of ``bible_pairs(split)``
    (module docstring: which mismatches). Raises ValueError for an unknown split."""
    _check_split(split, "bible_pair_examples")
    return list(_bible_pairs(split))


_WORD = re.compile(r"(?:Mr|Mrs|Dr|St|Messrs)\.|[^\W_]+(?:'[^\W_]+)*|-+|[^\w\s]")


def _word_key(word: str) -> str:
    key = word.lower()
    return key[:-2] if key.endswith("'s") else key


def _mid_sentence(words: Sequence[str], i: int) -> bool:
    """Whether word ``i`` of a sentence's words stands where capitals mark a name: after a word or a comma."""
    return i > 0 and (words[i - 1][0].isalnum() or words[i - 1] == ",")


def _capitalised(word: str) -> bool:
    return word[0].isupper() and not (len(word) > 1 and word.isupper())


@functools.lru_cache(maxsize=None)
def _lexicon() -> frozenset:
    """The word types capitalised in at least LEXICON_SHARE of (and LEXICON_MIN_COUNT) mid-sentence occurrences,
    over all six novels."""
    upper, lower = Counter(), Counter()
    for novel in NOVELS:
        for sentences in _chapters(novel):
            for sentence in sentences:
                words = _WORD.findall(sentence)
                for i, word in enumerate(words):
                    if word[0].isalpha() and _mid_sentence(words, i) and not (len(word) > 1 and word.isupper()):
                        (upper if word[0].isupper() else lower)[_word_key(word)] += 1
    return frozenset(k for k, n in upper.items() if n >= LEXICON_MIN_COUNT and n >= LEXICON_SHARE * (n + lower[k]))


def _tags(words: Sequence[str], lexicon: frozenset) -> list[str]:
    """One sentence's tags (module docstring: the rule)."""
    tags = []
    for i, word in enumerate(words):
        key = _word_key(word)
        if not word[0].isupper() or key in TITLES or word == "O" or word == "I" or word.startswith("I'"):
            tags.append("O")
        elif _capitalised(word) and _mid_sentence(words, i):
            tags.append("NAME")
        else:
            tags.append("NAME" if key in lexicon else "O")
    return tags


@functools.lru_cache(maxsize=None)
def _proper_nouns(split: str) -> tuple[LabeledExample, ...]:
    lexicon = _lexicon()
    out = []
    for _, where, sentences in _passages(split):
        words, tags = [], []
        for sentence in sentences:
            w = _WORD.findall(sentence)
            words += w
            tags += _tags(w, lexicon)
        out.append(LabeledExample(" ".join(sentences), tuple(tags), words=tuple(words), where=where))
    return tuple(out)


def proper_noun_examples(split: str) -> list[LabeledExample]:
    """The ``proper-nouns`` tagging task's examples of ``split``: the words of a passage of the novels
    (``words``), tagged ``"NAME"`` or ``"O"`` (``label``, one tag per word); the chapters of
    :func:`austen_novel_examples` (module docstring: the rule). Raises ValueError for an unknown split."""
    _check_split(split, "proper_noun_examples")
    return list(_proper_nouns(split))


# ---- encoding -------------------------------------------------------------------------------------------------

_ENCODE = "megacore.data.encode_examples"
HEADS = ("sequence", "token")


def _spaced_words(example: LabeledExample) -> list[str]:
    """``example.words`` as a space-aware tokenizer should see them: each after the first with a leading space
    where ``text`` has whitespace before it (every one, when the words cannot be found in order in ``text``)."""
    words, text = example.words, example.text
    out, position = [], 0
    for i, word in enumerate(words):
        found = text.find(word, position)
        if found < 0:
            return [w if i == 0 else " " + w for i, w in enumerate(words)]
        spaced = i > 0 and found > 0 and text[found - 1].isspace()
        out.append(" " + word if spaced else word)
        position = found + len(word)
    return out


def _cut(a: int, b: int, budget: int) -> tuple[int, int]:
    """The lengths of texts of ``a`` and ``b`` tokens cut to ``budget`` in all: the longer is cut first; when both
    must be cut, to half the budget each, the odd token to the longer (to the second on a tie). This is the
    ``tokenizers`` library's ``longest_first`` (transformers' fast tokenizers), which the one-at-a-time loop of
    transformers' Python tokenizers matches but for that odd token on a tie."""
    if a + b <= budget:
        return a, b
    swap = a > b
    short, long = (b, a) if swap else (a, b)
    long = max(short, budget - short) if short <= budget else short
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    return (long, short) if swap else (short, long)


def _encode_unique(tokenizer, texts: list) -> list:
    """``tokenizer.encode_batch(texts)``, each distinct text encoded once (tagging repeats words, bible-pair
    verses)."""
    distinct = list(dict.fromkeys(texts))
    table = dict(zip(distinct, tokenizer.encode_batch(distinct)))
    return [table[t] for t in texts]


def _word_pieces(examples, tokenizer, labels: LabelSet) -> tuple[list, list]:
    """Per tagging example, its words' pieces (int64 [n]) and their labels (int64 [n]: the word's tag id on its
    first piece, -100 on the others), as transformers' ``word_ids`` alignment. A word without pieces loses its
    tag."""
    spaced = getattr(tokenizer, "kind", "wordpiece") != "wordpiece"
    words, tag_ids, ids = [], [], {}  # ids: tag -> id, each distinct tag looked up once
    for e in examples:
        if e.words is None or not isinstance(e.label, tuple):
            raise ValueError(f"{_ENCODE}: {e.where}: head='token' needs a tagging example (words and a tag per word)")
        if len(e.words) != len(e.label):
            raise ValueError(f"{_ENCODE}: {e.where}: {len(e.words)} words but {len(e.label)} tags")
        words += _spaced_words(e) if spaced else list(e.words)
        for i, tag in enumerate(e.label):
            if tag not in ids:
                ids[tag] = labels.id(tag, where=f"{e.where}: word {i} {e.words[i]!r}")
            tag_ids.append(ids[tag])
    tag_ids = np.asarray(tag_ids, dtype=np.int64)
    pieces = _encode_unique(tokenizer, words)
    counts = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))  # pieces per word
    flat = np.fromiter((i for p in pieces for i in p), dtype=np.int64, count=int(counts.sum()))
    flat_labels = np.full(flat.size, IGNORE_INDEX, dtype=np.int64)
    word_offsets = np.concatenate([[0], np.cumsum(counts)])  # [words + 1]
    flat_labels[word_offsets[:-1][counts > 0]] = tag_ids[counts > 0]
    out_ids, out_labels, w = [], [], 0
    for e in examples:
        lo, hi = word_offsets[w], word_offsets[w + len(e.words)]
        out_ids.append(flat[lo:hi])
        out_labels.append(flat_labels[lo:hi])
        w += len(e.words)
    return out_ids, out_labels


class ClassificationDataset(torch.utils.data.Dataset):
    """Encoded :class:`LabeledExample` s (build one with :func:`encode_examples`), in the examples' order.

    ``ds[i]`` is a dict of torch tensors: ``input_ids``, ``attention_mask`` (1 = token), ``token_type_ids``: int64
    ``[seq_len]`` (padded with the tokenizer's ``pad``, mask and types 0 there); ``labels``: int64 ``[]``
    (sequence), float32 ``[]`` (regression) or int64 ``[seq_len]`` (token: -100 where nothing is predicted).

    Attributes: ``examples``, ``labels`` (the LabelSet; None for regression), ``head``, ``regression``,
    ``seq_len``, ``pad``, ``lengths`` (int64 [n]: each example's tokens, special tokens included),
    ``truncated`` (how many examples were cut to fit).
    """

    def __init__(self, examples, labels, head, regression, seq_len, pad, tokens, segment_starts, targets, truncated):
        self.examples, self.labels, self.head, self.regression = list(examples), labels, head, regression
        self.seq_len, self.pad, self.truncated = seq_len, pad, truncated
        self._tokens, self._segment_starts, self._targets = tokens, segment_starts, targets
        self.lengths = np.array([t.size for t in tokens], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, index: int) -> dict:
        if not _is_int(index):
            raise TypeError(f"megacore.data.ClassificationDataset: index must be an int, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"megacore.data.ClassificationDataset: index {index} out of range for {len(self)} "
                             "examples")
        tokens, start, n = self._tokens[index], self._segment_starts[index], self.lengths[index]
        input_ids = torch.full((self.seq_len,), self.pad, dtype=torch.int64)
        input_ids[:n] = torch.from_numpy(tokens)
        attention_mask = torch.zeros(self.seq_len, dtype=torch.int64)
        attention_mask[:n] = 1
        token_type_ids = torch.zeros(self.seq_len, dtype=torch.int64)
        token_type_ids[start:n] = 1
        target = self._targets[index]
        if self.head == "token":
            labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.int64)
            labels[:n] = torch.from_numpy(target)
        else:
            labels = torch.tensor(target, dtype=torch.float32 if self.regression else torch.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                "labels": labels}

    def __repr__(self) -> str:
        return (f"ClassificationDataset(examples={len(self)}, head={self.head!r}, regression={self.regression}, "
                f"seq_len={self.seq_len}, truncated={self.truncated})")


def encode_examples(examples: Sequence[LabeledExample], tokenizer, seq_len: int, labels: Optional[LabelSet],
                    head: str = "sequence", truncation: bool = False, regression: bool = False
                    ) -> ClassificationDataset:
    """``examples`` encoded for a classifier (the format is in the module docstring).

    Args:
        examples: the examples (:func:`read_labeled`, the embedded tasks); tagging examples need ``words``.
        tokenizer: a megacore ``Tokenizer`` (``encode_batch``, ``pad``, and ``cls`` + ``sep`` or ``eod``).
        seq_len: the padded length.
        labels: the label ids (:meth:`LabelSet.from_examples` of the training examples); ignored, may be None, for
            regression.
        head: ``"sequence"`` (a label per example) or ``"token"`` (a tag per word).
        truncation: cut examples too long for ``seq_len`` (``.truncated`` counts them) instead of raising.
        regression: the labels are numbers (sequence head only).

    Raises ValueError for a bad argument, a label not in ``labels`` or not a number (regression), a tagging
    example without words or without a tag per word, a sequence example with tags, and, without truncation,
    an example longer than ``seq_len`` (naming its ``where`` and the lengths).
    """
    if head not in HEADS:
        raise ValueError(f"{_ENCODE}: head must be one of {HEADS}, got {head!r}")
    if regression and head == "token":
        raise ValueError(f"{_ENCODE}: regression needs head='sequence' (a number per example), got head='token'")
    if not regression and not isinstance(labels, LabelSet):
        raise ValueError(f"{_ENCODE}: labels must be a LabelSet (LabelSet.from_examples of the training examples), "
                         f"got {type(labels).__name__}")
    if not regression and labels.regression:
        raise ValueError(f"{_ENCODE}: labels is a regression LabelSet; pass regression=True")
    if not _is_int(seq_len) or seq_len < 2:
        raise ValueError(f"{_ENCODE}: seq_len={seq_len!r} must be an int >= 2")
    if not examples:
        raise ValueError(f"{_ENCODE}: no examples")
    cls, sep, eod, pad = (getattr(tokenizer, a, None) for a in ("cls", "sep", "eod", "pad"))
    if pad is None:
        raise ValueError(f"{_ENCODE}: the tokenizer has no pad token")
    if cls is not None and sep is not None:
        before, between, after = [cls], [sep], [sep]  # [CLS] a [SEP] (b [SEP])
    elif eod is not None:
        before, between, after = [], [eod], [eod]  # a eod (b eod)
    else:
        raise ValueError(f"{_ENCODE}: the tokenizer has neither cls and sep nor eod tokens to mark the texts")
    if head == "token":
        a_side, a_labels = _word_pieces(examples, tokenizer, labels)
    else:
        for e in examples:
            if isinstance(e.label, tuple):
                raise ValueError(f"{_ENCODE}: {e.where}: head='sequence' needs one label per example, got "
                                 f"{len(e.label)} tags (use head='token')")
        a_side = _encode_unique(tokenizer, [e.text for e in examples])
    b_side = iter(_encode_unique(tokenizer, [e.text_pair for e in examples if e.text_pair is not None]))
    tokens, segment_starts, targets, truncated = [], [], [], 0
    for k, e in enumerate(examples):
        a = a_side[k]
        b = next(b_side) if e.text_pair is not None else None
        specials = len(before) + len(between) + (len(after) if b is not None else 0)
        budget = seq_len - specials
        if budget < (2 if b is not None else 1):
            raise ValueError(f"{_ENCODE}: seq_len={seq_len} leaves no room for the text"
                             f"{'s' if b is not None else ''} beside {specials} special tokens")
        la, lb = len(a), len(b) if b is not None else 0
        if la + lb > budget:
            if not truncation:
                second = f", second text {lb}" if b is not None else ""
                raise ValueError(f"{_ENCODE}: {e.where}: {la + lb + specials} tokens (text {la}{second}, {specials} "
                                 f"special), longer than seq_len {seq_len}; pass truncation=True to cut it")
            la, lb = _cut(la, lb, budget) if b is not None else (budget, 0)
            truncated += 1
        parts = [before, a[:la], between] + ([b[:lb], after] if b is not None else [])
        ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in parts])
        tokens.append(ids)
        # token type 1 from the second text on, with [CLS]/[SEP] (BERT); none without (GPT-2 has no token types)
        segment_starts.append(len(before) + la + len(between) if b is not None and cls is not None else ids.size)
        if head == "token":
            target = np.full(ids.size, IGNORE_INDEX, dtype=np.int64)
            target[len(before):len(before) + la] = a_labels[k][:la]
            targets.append(target)
        elif regression:
            value = _number(e.label)
            if value is None or not math.isfinite(value):
                raise ValueError(f"{_ENCODE}: {e.where}: label {e.label!r} is not a number (regression)")
            targets.append(value)
        else:
            targets.append(labels.id(e.label, where=e.where))
    return ClassificationDataset(examples, None if regression else labels, head, regression, int(seq_len), int(pad),
                                 tokens, segment_starts, targets, truncated)
