"""`megacore prepare`: text, directories of text, or JSONL -> a Megatron indexed dataset (``<prefix>.bin`` +
``<prefix>.idx``), with the tokenizer saved next to it (``<prefix>.tokenizer/``) so that training and
generation use the same one.

Pipeline: the main process reads and decodes documents in order (it knows file names, line numbers and byte
offsets, so every bad input is reported precisely) and groups them into chunks; a ``multiprocessing`` pool
tokenizes the chunks (``imap``, so the output is in input order and the same for any number of workers); the
main process appends each document (EOD at its end) to an :class:`IndexedDatasetBuilder`.

Documents:
  - text files (``.txt``, ``.txt.xz``, anything not JSONL): one document per file, per paragraph (blank-line
    separated) or per line (``document_unit``);
  - JSONL (``.jsonl``, ``.json``, ``.jsonl.xz``): one document per line, the text in field ``json_key``;
  - directories: every ``.txt``, ``.txt.xz``, ``.jsonl``, ``.jsonl.xz`` below them, recursively, sorted.

Bad input (``errors``: ``strict`` raises, ``replace`` decodes with U+FFFD, ``skip`` drops the document; either
way each case is reported with its position and counted in the summary):
  - undecodable bytes: file, line and byte offset;
  - an invalid JSON line, a missing or non-string field: file and line (``strict`` raises; ``replace`` and
    ``skip`` skip the line, since there is nothing to replace);
  - empty documents (no text, or no tokens) are always skipped and counted.

Output never destroys what exists. A run writes the new ``.bin``, ``.idx`` and tokenizer into a staging
directory of its own next to the output (``.NAME.prepare-HOST-PID-XXXXXXXX/``); nothing under the output's
names is touched until all three are complete and on disk. Then it commits by renames within the directory
(under a lock on it, where the file system has one, so two runs never interleave): the old ``.idx`` goes
aside first, then the old tokenizer and ``.bin``; the new tokenizer and ``.bin`` go in, the new ``.idx``
last. The guarantee: at every instant, on disk, either ``PREFIX.idx`` is absent or ``PREFIX.idx``,
``PREFIX.bin`` and ``PREFIX.tokenizer`` are all one run's; a dataset is never a mismatched pair. So:
  - a run that fails, is interrupted or is killed (``kill -9``) before its commit leaves the previous dataset
    exactly as it was; an error inside the commit moves the old files back;
  - a kill inside the commit itself (a handful of renames, microseconds) leaves no ``.idx``: no dataset,
    never a wrong one; rerun prepare;
  - a reader that already opened the dataset keeps reading the old files (a rename does not change open
    files). One that opens it while a commit runs can pair an old ``.idx`` with a new ``.bin``, since
    ``IndexedDataset`` opens the two one after the other: do not prepare into a prefix a job is opening.
A killed run leaves its staging directory; the next run of the same prefix removes those of runs that are
gone (this host, process id no longer alive) and leaves a running one's, and another host's, alone.
A ``PREFIX.tokenizer`` (or ``.bin``, ``.idx``) that is a symbolic link is replaced as a link: what it points
to is never touched. A ``.bin``/``.idx`` name that is a directory, or a tokenizer name that is a file, is
refused before any work. Inputs without a single token are refused too: nothing is written.

Memory is bounded per document. The tokenizer never gets more than ``chunk_chars`` characters in one call
(1 Mi by default) nor one text longer than ``piece_chars`` (64 Ki): a longer document goes to it in pieces,
and each piece's tokens become an array of the dataset's dtype at once (not a list of Python ints). So its
working memory stays under ~150 bytes x (chunk_chars + piece_chars), ~160 MB per worker, however long the
document; the document itself costs about 5x its size (its text, held a few times as read, decoded and sent
to a worker, and its tokens). Measured (`megacore prepare big.jsonl --tokenizer T`, one 20 MiB JSONL line,
byte-level BPE of 600 tokens, one worker, peak RSS from getrusage): 411 MB, the process's own 231 MB + 180 MB,
where encoding the line whole took 3.7 GB.
Pieces are cut just before a space (U+0020) that follows a non-whitespace character. For byte-level BPE
(GPT-2's regex pre-tokenizer, trained here or loaded from GPT-2's files) and BERT WordPiece (BERT's normalizer
and pre-tokenizer) this is a word boundary that no pre-token crosses and whose sides pre-tokenize on their own
as they do in the whole text, so the pieces' tokens are exactly the whole document's. A ``tokenizer.json`` of
these kinds is cut the same way; it is exact when no pre-token runs from a non-space into the space after it
(true of GPT-2-, Llama-3- and BERT-style pipelines) and no added token strips the spaces after it. Only a run
of more than ``piece_chars`` characters without such a space is cut at the limit, where tokens can differ
from encoding it whole. Other tokenizer kinds (sentencepiece, unigram, ...) get whole documents: their
normalizers may treat a leading space differently (Llama's prepends ``▁`` to every text), so their memory
still grows with a document's length.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import lzma
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from megacore.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)

ERRORS = ("strict", "replace", "skip")
DOCUMENT_UNITS = ("file", "paragraph", "line")
FORMATS = ("auto", "text", "jsonl")
TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram")
TEXT_SUFFIXES = (".txt", ".txt.xz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.xz", ".json.xz")
_XZ_MAGIC = b"\xfd7zXZ\x00"


def tokenizer_path(prefix: str | os.PathLike) -> Path:
    """Where ``prepare`` saves the tokenizer of ``<prefix>.bin/.idx``: the directory ``<prefix>.tokenizer``."""
    return Path(os.fspath(prefix) + ".tokenizer")


class PrepareError(ValueError):
    """Bad input to ``megacore prepare``; the message names the file and position."""


@dataclass
class PrepareSummary:
    """What a ``prepare`` (or ``merge``) run did."""

    output: str
    documents: int = 0  # written
    skipped_empty: int = 0
    skipped_errors: int = 0  # undecodable (errors="skip"), invalid JSON, missing field
    replaced: int = 0  # documents with undecodable bytes decoded with U+FFFD
    tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0  # tokenizing and writing
    tokenizer_seconds: float = 0.0  # loading or training the tokenizer
    problems: list[str] = field(default_factory=list)  # one line per reported bad input (the first 100)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        skipped = f"{self.skipped_empty} empty"
        if self.skipped_errors:
            skipped += f", {self.skipped_errors} bad"
        replaced = f", {self.replaced} with bytes replaced" if self.replaced else ""
        return (f"megacore prepare: {self.output}.bin/.idx: {self.documents} documents ({skipped} skipped"
                f"{replaced}), {self.tokens} tokens, {self.sequences} sequences in {self.seconds:.1f} s "
                f"({self.tokens_per_second:,.0f} tokens/s)")


# -- reading documents ------------------------------------------------------------------------------------------
@dataclass
class _Document:
    text: str
    where: str  # "file", "file:line N" — for messages
    progress: int  # input bytes (on disk) this document accounts for: drives the progress bar and its ETA


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "jsonl"
    return path.name.lower().endswith(JSONL_SUFFIXES)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, and the text / JSONL files below directories named (recursively, sorted).
    Raises PrepareError for a missing path or a directory without any."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
            if not found:
                raise PrepareError(f"megacore prepare: directory {p} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PrepareError(f"megacore prepare: input {p} does not exist")
    return files


class _Reader:
    """Streams (text, position) documents from files, applying the error policy and counting what it skips."""

    def __init__(self, files: Sequence[Path], *, fmt: str, json_key: str, document_unit: str, errors: str,
                 summary: PrepareSummary, warn: Callable[[str], None]):
        self.files, self.fmt, self.json_key, self.unit, self.errors = files, fmt, json_key, document_unit, errors
        self.summary, self.warn = summary, warn

    def _problem(self, message: str, counter: str) -> None:
        setattr(self.summary, counter, getattr(self.summary, counter) + 1)
        # The first 100 are kept and shown; a file with a million bad lines must not flood the terminal.
        if len(self.summary.problems) < 100:
            self.summary.problems.append(message)
            self.warn(message)
            if len(self.summary.problems) == 100:
                self.warn("megacore prepare: further problems are counted in the summary, not shown")

    def _decode(self, raw: bytes, path: Path, offset: int, line: int) -> str | None:
        """UTF-8 text of ``raw`` (found at byte ``offset``, line ``line`` of ``path``) under the policy; None
        when the document is skipped."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            at_line = line + raw.count(b"\n", 0, e.start)
            msg = (f"megacore prepare: {path}:line {at_line}: undecodable bytes {raw[e.start:e.end]!r} at byte "
                   f"{offset + e.start} ({e.reason})")
            if self.errors == "strict":
                raise PrepareError(msg + "; pass --errors replace or --errors skip to go on") from None
            if self.errors == "skip":
                self._problem(msg + "; document skipped", "skipped_errors")
                return None
            self._problem(msg + "; replaced with U+FFFD", "replaced")
            return raw.decode("utf-8", errors="replace")

    def __iter__(self) -> Iterator[_Document]:
        for path in self.files:
            if _is_jsonl(path, self.fmt):
                yield from self._jsonl(path)
            else:
                yield from self._text(path)

    @staticmethod
    def _open(path: Path):
        """(binary stream of the decompressed content, the raw file: its tell() is the on-disk progress)."""
        raw = open(path, "rb")
        if raw.read(6) == _XZ_MAGIC:
            raw.seek(0)
            return lzma.open(raw), raw
        raw.seek(0)
        return raw, raw

    def _text(self, path: Path) -> Iterator[_Document]:
        stream, raw = self._open(path)
        try:
            with raw, stream:
                try:
                    data = stream.read()
                except lzma.LZMAError as e:
                    raise PrepareError(f"megacore prepare: {path} is a corrupt or truncated xz file: {e}") from None
                size = raw.tell()
        except OSError as e:
            raise PrepareError(f"megacore prepare: cannot read {path}: {e}") from None
        if self.unit == "file":
            pieces = [(data, 0, 1)]
        else:
            # Split the bytes, not the text, so a bad byte costs one paragraph/line and offsets stay exact.
            sep = rb"\r?\n" if self.unit == "line" else rb"(?:\r?\n[ \t]*){2,}"
            pieces, start, line = [], 0, 1
            for m in re.finditer(sep, data):
                pieces.append((data[start:m.start()], start, line))
                line += data.count(b"\n", start, m.end())
                start = m.end()
            # The file's final newline ends its last line or paragraph; it does not start an empty one.
            last = re.sub(rb"\r?\n\Z", b"", data[start:]) if start < len(data) else b""
            if last or not pieces:
                pieces.append((last, start, line))
        total = max(len(data), 1)
        for piece, offset, line in pieces:
            progress = size * len(piece) // total
            where = str(path) if self.unit == "file" else f"{path}:line {line}"
            text = self._decode(piece, path, offset, line)
            if text is None:
                yield _Document("", where, progress)  # skipped; still advances the progress bar
                continue
            if not text.strip():
                self.summary.skipped_empty += 1
                yield _Document("", where, progress)
                continue
            yield _Document(text, where, progress)

    def _jsonl(self, path: Path) -> Iterator[_Document]:
        stream, raw = self._open(path)
        with raw, stream:
            last = 0
            lineno = 0
            offset = 0
            while True:
                try:
                    line = stream.readline()
                except lzma.LZMAError as e:
                    raise PrepareError(f"megacore prepare: {path} is a corrupt or truncated xz file: {e}") from None
                if not line:
                    break
                lineno += 1
                pos = raw.tell()
                progress, last = pos - last, pos
                where = f"{path}:line {lineno}"
                line_offset, offset = offset, offset + len(line)
                if not line.strip():
                    yield _Document("", where, progress)  # blank lines separate nothing; not documents
                    continue
                text = self._decode(line, path, line_offset, lineno)
                if text is None:
                    yield _Document("", where, progress)
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    self._bad_record(f"megacore prepare: {where}: invalid JSON ({e.msg} at column {e.colno})")
                    yield _Document("", where, progress)
                    continue
                if not isinstance(record, dict) or self.json_key not in record:
                    keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
                    self._bad_record(f"megacore prepare: {where}: no field {self.json_key!r} (has {keys}); "
                                     f"choose the field with --json-key")
                    yield _Document("", where, progress)
                    continue
                value = record[self.json_key]
                if not isinstance(value, str):
                    self._bad_record(f"megacore prepare: {where}: field {self.json_key!r} is a "
                                     f"{type(value).__name__}, expected a string")
                    yield _Document("", where, progress)
                    continue
                if not value.strip():
                    self.summary.skipped_empty += 1
                    yield _Document("", where, progress)
                    continue
                yield _Document(value, where, progress)

    def _bad_record(self, msg: str) -> None:
        if self.errors == "strict":
            raise PrepareError(msg + "; pass --errors skip to skip such lines")
        self._problem(msg + "; line skipped", "skipped_errors")


# -- sentence splitting -----------------------------------------------------------------------------------------
# A sentence ends at . ! or ? (then any closing quotes or brackets) followed by whitespace and a capital letter,
# digit or opening quote — unless the word before the period is a common abbreviation ("Mr. Darcy"), an
# initial ("J. Austen") or a number ("1. "). Simple and predictable rather than linguistically complete.
_SENTENCE_END = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(?=\s+["'\u201c\u2018(\[]?[A-Z0-9])""")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st mt jr sr messrs mme mlle rev col capt gen lt sgt prof hon esq vs etc no vol ch fig "
    "e.g i.e cf al jan feb mar apr jun jul aug sep sept oct nov dec".split())


def split_sentences(text: str) -> list[str]:
    """Splits ``text`` into sentences (see the rule above); whitespace around them is dropped, so the
    sentences joined with single spaces approximate the text. Returns [] for blank text."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if text[m.start()] == ".":
            word = re.search(r"(\S+)$", text[start:m.start()])
            w = word.group(1).lower().lstrip("\"'(\u201c\u2018[") if word else ""
            if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()) or w.isdigit():
                continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


# -- tokenization (runs in the workers) -------------------------------------------------------------------------
_worker_tokenizer = None
_worker_options: dict = {}


def _init_worker(tokenizer, options: dict) -> None:
    global _worker_tokenizer, _worker_options
    _worker_tokenizer, _worker_options = tokenizer, options


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
    """Documents -> (all their tokens concatenated [total] in the dataset's dtype, per document the lengths of
    its sequences). The EOD goes at the end of a document's last sequence; a document without tokens gets no
    sequences. The tokenizer sees at most ``batch_chars`` characters per call and, where ``piece_chars`` is
    set, no text longer than that (:func:`_pieces`), however long the documents are."""
    tok, opts = _worker_tokenizer, _worker_options
    dtype, limit, eod = opts["dtype"], opts["piece_chars"], opts["eod"]
    docs = [split_sentences(t) for t in texts] if opts["split_sentences"] else [[t] for t in texts]
    sequences = [s for doc in docs for s in doc]
    parts: list[list[np.ndarray]] = [[] for _ in sequences]  # per sequence, the tokens of its pieces
    pieces = ((i, piece) for i, s in enumerate(sequences) for piece in (_pieces(s, limit) if limit else (s,)))
    for batch in _batches(pieces, opts["batch_chars"]):
        for (i, _), ids in zip(batch, tok.encode_batch([piece for _, piece in batch])):
            parts[i].append(np.asarray(ids, dtype=dtype))  # [n]; compact at once, not a list of Python ints
    arrays, lengths, i = [], [], 0
    for doc in docs:
        seq_lengths = []
        for _ in doc:
            size = sum(len(a) for a in parts[i])
            if size:
                arrays.extend(parts[i])
                seq_lengths.append(size)
            i += 1
        if seq_lengths and eod is not None:
            arrays.append(np.array([eod], dtype=dtype))
            seq_lengths[-1] += 1
        lengths.append(seq_lengths)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
    return tokens, lengths


def _pieces(text: str, limit: int) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, each after the first beginning with a
    space that follows a non-whitespace character: where the tokens of the pieces are those of the whole (see
    the module docstring). A stretch of ``limit`` characters without such a space is cut at the limit."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind(" ", start + 1, end + 1)
        # str.isspace covers every character the tokenizers' \s and char::is_whitespace match (and a few more).
        while cut > start and text[cut - 1].isspace():
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _batches(items: Iterable[tuple[int, str]], max_chars: int) -> Iterator[list[tuple[int, str]]]:
    """Consecutive lists of (sequence, text) whose texts hold about ``max_chars`` characters (at most one text
    more)."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _chunks(documents: Iterable[_Document], chunk_chars: int, chunk_docs: int) -> Iterator[tuple[list[str], int]]:
    """Groups the non-empty documents into (texts, input bytes they account for), bounded by characters (a
    chunk of many short lines and one of a few novels should cost the workers about the same)."""
    texts, chars, progress = [], 0, 0
    for doc in documents:
        progress += doc.progress
        if doc.text:
            texts.append(doc.text)
            chars += len(doc.text)
        if chars >= chunk_chars or len(texts) >= chunk_docs:
            yield texts, progress
            texts, chars, progress = [], 0, 0
    if texts or progress:
        yield texts, progress


# -- the command ------------------------------------------------------------------------------------------------
def _load_or_train_tokenizer(tokenizer, train_tokenizer, vocab_size, training_texts: Callable[[], list[str]],
                             log: Callable[[str], None]):
    from megacore.data.tokenizer import Tokenizer, train_bpe, train_unigram, train_wordpiece

    if tokenizer is not None and train_tokenizer is not None:
        raise PrepareError("megacore prepare: pass either --tokenizer or --train-tokenizer, not both")
    if tokenizer is not None:
        if vocab_size is not None:
            raise PrepareError("megacore prepare: --vocab-size is for a trained tokenizer; --tokenizer has its own")
        if isinstance(tokenizer, (str, os.PathLike)):
            return Tokenizer.load(tokenizer)
        return tokenizer
    kind = train_tokenizer or "bpe"
    if kind not in TOKENIZER_KINDS:
        raise PrepareError(f"megacore prepare: --train-tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
    vocab_size = 8192 if vocab_size is None else vocab_size
    texts = training_texts()
    log(f"megacore prepare: training a {kind} tokenizer (vocab {vocab_size}) on the inputs")
    train = {"bpe": train_bpe, "wordpiece": train_wordpiece, "unigram": train_unigram}[kind]
    return train(texts, vocab_size=vocab_size)


# -- output: staged next to the prefix, then committed by renames (the guarantee: module docstring) ---------------
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


class _Staging:
    """A run's own directory next to the output, ``.NAME.prepare-HOST-PID-XXXXXXXX/``, removed when the run ends
    (with whatever is left in it). The new dataset is written in it under the prefix ``new`` and the old one
    is set aside in it (``old.*``) during the commit; its name tells a later run whose it is."""

    def __init__(self, output: str):
        directory, name = os.path.split(os.path.abspath(output))
        self.path = tempfile.mkdtemp(prefix=f".{name}.prepare-{_HOST}-{os.getpid()}-", dir=directory)
        self.prefix = os.path.join(self.path, "new")

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # entries that are links are unlinked, never followed


def _output_names(prefix: str) -> list[str]:
    """The paths of a dataset, in the order a commit takes the old ones away: .idx, tokenizer, .bin."""
    return [index_file_path(prefix), os.fspath(tokenizer_path(prefix)), data_file_path(prefix)]


def _check_output_names(output: str) -> None:
    """Refuses output names that hold what prepare does not replace: a directory where the .bin or .idx goes, a
    file (neither directory nor link) where the tokenizer's directory goes."""
    idx, tok, bin_ = _output_names(output)
    for path in (bin_, idx):
        if os.path.isdir(path) and not os.path.islink(path):
            raise PrepareError(f"megacore prepare: {path} is a directory, where the dataset's file goes; move it "
                               f"or choose another --output")
    if os.path.lexists(tok) and not os.path.islink(tok) and not os.path.isdir(tok):
        raise PrepareError(f"megacore prepare: {tok} is a file, where the tokenizer's directory goes; move it or "
                           f"choose another --output")


def _commit(stage: _Staging, output: str, log: Callable[[str], None]) -> None:
    """Puts the dataset staged in ``stage`` (.bin, .idx, optionally a tokenizer) under ``output``'s names: the
    old .idx, tokenizer and .bin go aside into ``stage``, the new tokenizer, .bin and .idx (last) come out of
    it. Any failure moves back what was moved. Raises PrepareError naming the paths."""
    targets = _output_names(output)
    aside = _output_names(os.path.join(stage.path, "old"))
    new = _output_names(stage.prefix)
    moves = [(t, a) for t, a in zip(targets, aside) if os.path.lexists(t)]
    moves += [(n, t) for n, t in zip(new[::-1], targets[::-1]) if os.path.lexists(n)]  # tokenizer, .bin, .idx
    done: list[tuple[str, str]] = []
    with _directory_lock(os.path.dirname(targets[0])):
        _check_output_names(output)  # again: the names may have changed while this run tokenized
        try:
            for src, dst in moves:
                os.replace(src, dst)
                done.append((src, dst))
        except BaseException as e:
            for back_src, back_dst in reversed(done):
                try:
                    os.replace(back_dst, back_src)
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise PrepareError(f"megacore prepare: cannot move {src} to {dst} ({e.strerror}); the previous "
                                   f"dataset at {output} is left as it was") from e
            raise
    if os.path.islink(aside[1]):
        log(f"megacore prepare: {targets[1]} was a link to {os.readlink(aside[1])}; the link is now the "
            f"tokenizer's directory, what it pointed to is untouched")


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    """An exclusive flock on ``directory`` while the block runs, so that two runs' commits do not interleave.
    A file system that has no flock for directories (NFS can refuse it) runs the block unlocked."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_runs(output: str, log: Callable[[str], None]) -> None:
    """Removes the staging directories that killed runs of ``output`` left: those of this host whose process is
    gone. A live run's, or another host's (whose processes this one cannot see), are left alone."""
    directory, name = os.path.split(os.path.abspath(output))
    pattern = re.compile(rf"\.{re.escape(name)}\.prepare-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[a-z0-9_]+")
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and m["host"] == _HOST and entry.is_dir(follow_symlinks=False) and not _alive(int(m["pid"])):
            shutil.rmtree(entry.path, ignore_errors=True)
            log(f"megacore prepare: removed {entry.path}, left by an interrupted run")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _output_directory(path: str) -> Iterator[None]:
    """Makes the directory ``path`` and its missing parents for the block (``-o data/web`` makes ``data/``, as a
    user expects); a block that fails removes those it made: a failed run leaves no trace."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d)
    try:
        yield
    except BaseException:
        for d in missing:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise


def _nothing_to_tokenize(inputs: Sequence | None, files: Sequence[Path], counts: PrepareSummary) -> PrepareError:
    inputs = list(inputs or files)
    named = ", ".join(map(str, inputs[:5])) + (f" and {len(inputs) - 5} more" if len(inputs) > 5 else "")
    skipped = f"{counts.skipped_empty} empty" + (f", {counts.skipped_errors} bad" if counts.skipped_errors else "")
    return PrepareError(f"megacore prepare: no text to tokenize in {named} ({len(files)} file(s); {skipped} "
                        f"documents skipped); nothing written")


def prepare_dataset(
    inputs: Sequence[str | os.PathLike] | None,
    output: str | os.PathLike,
    *,
    tokenizer=None,
    train_tokenizer: str | None = None,
    vocab_size: int | None = None,
    split: str = "train",
    fmt: str = "auto",
    json_key: str = "text",
    document_unit: str = "file",
    workers: int = 1,
    append_eod: bool = True,
    split_sentences: bool = False,
    errors: str = "strict",
    chunk_chars: int = 1 << 20,
    chunk_docs: int = 1024,
    piece_chars: int = 1 << 16,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PrepareSummary:
    """Tokenizes ``inputs`` into ``<output>.bin`` + ``<output>.idx`` and saves the tokenizer to
    ``<output>.tokenizer/``.

    Args:
        inputs: files and directories (see the module docstring); None or empty: the embedded corpus's
            ``split`` ("train": five novels, "valid": persuasion, "all").
        tokenizer: a :class:`megacore.data.tokenizer.Tokenizer` or the path of a saved one; else one is trained
            on the inputs: ``train_tokenizer`` "bpe" (the default), "wordpiece" or "unigram" (sentencepiece-style, with
            T5's 100 sentinel tokens), of ``vocab_size`` (8192).
        document_unit: for text files, one document per "file", "paragraph" or "line".
        workers: tokenizing processes (1: in this process).
        append_eod: end every document with the tokenizer's ``eod`` (WordPiece: ``[SEP]``).
        split_sentences: each sentence its own sequence (see :func:`split_sentences`).
        errors: "strict" | "replace" | "skip", for undecodable bytes and bad JSONL lines.
        chunk_chars, chunk_docs: the work of one task: documents up to this many characters or documents; also
            the most characters the tokenizer gets in one call.
        piece_chars: the longest text the tokenizer gets in one call (BPE and WordPiece; see the module
            docstring: the tokens are the same).
    Token dtype: uint16 for vocabularies under 65,500 tokens, else int32.
    Returns a :class:`PrepareSummary`. Raises PrepareError (a ValueError) for bad input and arguments, for
    inputs without any token and for output names it cannot replace, naming the file (and position); the
    output's names are left as they were then (see the module docstring).
    """
    start = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    output = os.fspath(output)
    if errors not in ERRORS:
        raise PrepareError(f"megacore prepare: errors must be one of {ERRORS}, got {errors!r}")
    if document_unit not in DOCUMENT_UNITS:
        raise PrepareError(f"megacore prepare: document_unit must be one of {DOCUMENT_UNITS}, got {document_unit!r}")
    if fmt not in FORMATS:
        raise PrepareError(f"megacore prepare: format must be one of {FORMATS}, got {fmt!r}")
    for name, value in (("workers", workers), ("chunk_chars", chunk_chars), ("chunk_docs", chunk_docs),
                        ("piece_chars", piece_chars)):
        if not isinstance(value, int) or value < 1:
            raise PrepareError(f"megacore prepare: {name} must be a positive int, got {value!r}")
    out_dir = os.path.dirname(os.path.abspath(output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"megacore prepare: the output's parent {out_dir} is not a directory")
    _check_output_names(output)
    _remove_stale_runs(output, log)

    if inputs:
        files = expand_inputs(inputs)
    else:
        from megacore.data.corpus import corpus_files

        files = corpus_files(split)
        log(f"megacore prepare: no inputs given: the embedded corpus, split {split!r} "
            f"({', '.join(p.name for p in files)})")
    summary = PrepareSummary(output=output)

    def reader(s: PrepareSummary, warn=log) -> _Reader:
        return _Reader(files, fmt=fmt, json_key=json_key, document_unit=document_unit, errors=errors,
                       summary=s, warn=warn)

    def training_texts() -> list[str]:
        # Training reads the inputs once more; its own (silent) count so the summary reports each problem once.
        counts = PrepareSummary(output)
        texts = [d.text for d in reader(counts, warn=lambda m: None) if d.text]
        if not texts:
            raise _nothing_to_tokenize(inputs, files, counts)
        return texts

    tok = _load_or_train_tokenizer(tokenizer, train_tokenizer, vocab_size, training_texts, log)
    summary.tokenizer_seconds = time.perf_counter() - start
    start = time.perf_counter()  # tokens/s measures tokenizing and writing, not training the tokenizer
    eod = None
    if append_eod:
        eod = tok.eod
        if eod is None:
            raise PrepareError("megacore prepare: the tokenizer has no EOD token (nor SEP); pass --no-eod")
    dtype = best_dtype(tok.vocab_size)
    cut = getattr(tok, "kind", None) in ("bpe", "wordpiece")  # where pieces give the same tokens
    options = {"eod": eod, "split_sentences": split_sentences, "dtype": dtype, "batch_chars": chunk_chars,
               "piece_chars": piece_chars if cut else 0}
    total_bytes = sum(p.stat().st_size for p in files)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="megacore prepare",
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    pool = None
    try:
        with _output_directory(out_dir), _Staging(output) as stage:
            with IndexedDatasetBuilder(data_file_path(stage.prefix), dtype) as builder:
                pool = _make_pool(workers, tok, options) if workers > 1 else None
                chunks = _chunks(reader(summary), chunk_chars, chunk_docs)
                if pool is None:
                    _init_worker(tok, options)
                    results = ((_tokenize_chunk(texts), p) for texts, p in chunks)
                else:
                    results = _ordered(pool, chunks, 2 * workers + 2)
                for (tokens, lengths), p in results:
                    pos = 0
                    for seq_lengths in lengths:
                        size = sum(seq_lengths)
                        if size == 0:  # text with no tokens (e.g. only characters the tokenizer drops)
                            summary.skipped_empty += 1
                            continue
                        builder.add_document(tokens[pos:pos + size], lengths=seq_lengths)
                        pos += size
                        summary.documents += 1
                        summary.sequences += len(seq_lengths)
                        summary.tokens += size
                    if bar is not None:
                        bar.update(p)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"{summary.documents} docs, {summary.tokens / elapsed:,.0f} tokens/s",
                                            refresh=False)
                if pool is not None:
                    pool.close()
                    pool.join()
                if summary.documents == 0:
                    raise _nothing_to_tokenize(inputs, files, summary)
                builder.finalize(index_file_path(stage.prefix))
            tok.save(tokenizer_path(stage.prefix))
            _commit(stage, output, log)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _ordered(pool, chunks, window: int):
    """Tokenizes chunks in the pool, results in input order, with at most ``window`` chunks in flight: the
    reader (in this thread, so its errors surface here) stays just ahead of the workers, and memory is
    bounded however large the input (``Pool.imap`` would read all of it ahead)."""
    from collections import deque

    pending = deque()
    for texts, p in chunks:
        pending.append((pool.apply_async(_tokenize_chunk, (texts,)), p))
        if len(pending) >= window:
            result, p0 = pending.popleft()
            yield result.get(), p0
    while pending:
        result, p0 = pending.popleft()
        yield result.get(), p0


def _make_pool(workers: int, tokenizer, options: dict):
    """A pool whose workers tokenize single-threaded (the workers are the parallelism). Forked where possible
    (the tokenizer is inherited); spawned workers re-import torch (seconds each) and unpickle it."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Read by `tokenizers` at fork time and in the children: no thread pools inside the workers, and no
    # warning about forking after the parent used its threads (e.g. to train the tokenizer).
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, options))
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def merge_datasets(prefixes: Sequence[str | os.PathLike], output: str | os.PathLike,
          log: Callable[[str], None] | None = None) -> PrepareSummary:
    """Concatenates prepared datasets (same dtype) into ``<output>.bin/.idx``, documents in the given order.
    Their tokenizers (``<prefix>.tokenizer/``), where present, must be identical; it is copied next to the
    output. The output is written as :func:`prepare_dataset` writes it (staged, then committed by renames).
    Raises PrepareError for a missing dataset, mixed dtypes or different tokenizers."""
    start = time.perf_counter()
    log = log or (lambda message: print(message, file=sys.stderr))
    output = os.fspath(output)
    if not prefixes:
        raise PrepareError("megacore prepare --merge: no datasets to merge")
    datasets = []
    for prefix in prefixes:
        try:
            datasets.append(IndexedDataset(prefix))
        except FileNotFoundError as e:
            raise PrepareError(f"megacore prepare --merge: {e}") from None
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) > 1:
        raise PrepareError("megacore prepare --merge: the datasets hold different dtypes: "
                           + ", ".join(f"{d.prefix} {d.dtype.name}" for d in datasets))
    tokenizers = [tokenizer_path(p) for p in prefixes if tokenizer_path(p).is_dir()]
    for other in tokenizers[1:]:
        if _directory_bytes(other) != _directory_bytes(tokenizers[0]):
            raise PrepareError(f"megacore prepare --merge: {other} differs from {tokenizers[0]}: the datasets were "
                               f"tokenized differently and cannot be merged")
    if any(os.path.abspath(p) == os.path.abspath(output) for p in map(os.fspath, prefixes)):
        raise PrepareError(f"megacore prepare --merge: the output {output} is one of the inputs")
    _check_output_names(output)
    _remove_stale_runs(output, log)
    summary = PrepareSummary(output=output)
    with _output_directory(os.path.dirname(os.path.abspath(output))), _Staging(output) as stage:
        with IndexedDatasetBuilder(data_file_path(stage.prefix), dtypes.pop()) as builder:
            for d in datasets:
                builder.merge(d.prefix)
                summary.documents += d.num_documents
                summary.sequences += len(d)
                summary.tokens += d.num_tokens
            builder.finalize(index_file_path(stage.prefix))
        if tokenizers:  # else the output has none: an old one must not stay beside the new data
            shutil.copytree(tokenizers[0], tokenizer_path(stage.prefix))
        _commit(stage, output, log)
    summary.seconds = time.perf_counter() - start
    return summary


def _directory_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
