"""Sequence-to-sequence data: (source, target) text pairs from JSONL or TSV files, and the dataset an
encoder-decoder trains on.

Files: ``.jsonl`` / ``.json`` (one JSON object per line, the texts under ``source_key`` and ``target_key``) or
``.tsv`` / ``.txt`` (tab-separated, the first line a header naming the columns), optionally ``.xz``-compressed. A
line that is not what it should be (bad JSON, a missing field, a value that is not a string, an empty text, a TSV
row of the wrong width) is an error naming the file and the line; blank lines are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megacore.data.masked_lm import IGNORE_INDEX, _is_int
from megacore.data.records import file_format, json_object, nonblank_lines, read_file_text

__all__ = ["Seq2SeqDataset", "TextPair", "encoder_decoder_item", "read_pairs", "tokenize_pairs"]

_FN = "megacore.data.read_pairs"
JSONL_SUFFIXES = (".jsonl", ".json")
TSV_SUFFIXES = (".tsv", ".txt")
_FORMATS = {"jsonl": JSONL_SUFFIXES, "tsv": TSV_SUFFIXES}
_FORMAT_HINT = ".jsonl / .json (JSON lines) or .tsv (tab-separated with a header line), optionally .xz"


@dataclass(frozen=True)
class TextPair:
    """A source text and its target; ``where`` says where it was read (``file:line``), for messages."""

    source: str
    target: str
    where: str = ""


def read_pairs(path: str | os.PathLike, source_key: str = "source", target_key: str = "target") -> list[TextPair]:
    """The (source, target) pairs of a JSONL or TSV file, in file order (module docstring).

    Raises FileNotFoundError for a missing file, ValueError naming the file and line for a bad line, a missing
    key or column, and for a file without any pair."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{_FN}: {path} does not exist or is not a file")
    for name, key in (("source_key", source_key), ("target_key", target_key)):
        if not isinstance(key, str) or not key:
            raise ValueError(f"{_FN}: {name}={key!r} must be a non-empty str")
    fmt = file_format(path, _FORMATS, _FN, _FORMAT_HINT)
    text = read_file_text(path, _FN)
    pairs: list[TextPair] = []
    columns: Optional[tuple[int, int]] = None
    width = 0
    for number, line in nonblank_lines(text):
        where = f"{path}:{number}"
        if fmt == "tsv" and columns is None:  # the header
            header = line.split("\t")
            missing = [k for k in (source_key, target_key) if k not in header]
            if missing:
                raise ValueError(f"{_FN}: {where}: the header {header} has no column {missing[0]!r} (a TSV file "
                                 "starts with a header line naming its columns; pick them with --source-key / "
                                 "--target-key)")
            columns, width = (header.index(source_key), header.index(target_key)), len(header)
            continue
        if fmt == "tsv":
            fields = line.split("\t")
            if len(fields) != width:
                raise ValueError(f"{_FN}: {where}: {len(fields)} tab-separated fields, the header has {width}")
            source, target = fields[columns[0]], fields[columns[1]]
        else:
            record = json_object(line, where, _FN)
            for key in (source_key, target_key):
                if key not in record:
                    raise ValueError(f"{_FN}: {where}: no field {key!r} (fields: {', '.join(sorted(record)) or 'none'}; "
                                     "pick them with --source-key / --target-key)")
                if not isinstance(record[key], str):
                    raise ValueError(f"{_FN}: {where}: field {key!r} is a {type(record[key]).__name__}, expected text")
            source, target = record[source_key], record[target_key]
        for key, text in ((source_key, source), (target_key, target)):
            if not text.strip():
                raise ValueError(f"{_FN}: {where}: the {key!r} text is empty")
        pairs.append(TextPair(source, target, where))
    if not pairs:
        raise ValueError(f"{_FN}: {path} holds no pairs")
    return pairs


def tokenize_pairs(pairs: Sequence[TextPair], tokenizer, source_prefix: str = "") -> list[tuple[list, list]]:
    """``[(source ids, target ids)]``: each text encoded (the source after ``source_prefix``) and ended with the
    tokenizer's ``eod`` (``</s>``), as T5 reads and writes them."""
    eos = getattr(tokenizer, "eod", None)
    if not _is_int(eos):
        raise ValueError("megacore.data.tokenize_pairs: the tokenizer has no eod token (</s>) to end the texts with")
    sources = tokenizer.encode_batch([source_prefix + p.source for p in pairs])
    targets = tokenizer.encode_batch([p.target for p in pairs])
    return [(s + [eos], t + [eos]) for s, t in zip(sources, targets)]


def encoder_decoder_item(source: np.ndarray, target: np.ndarray, source_length: int, target_length: int,
                         pad: int) -> dict[str, np.ndarray]:
    """An encoder-decoder sample: ``input_ids [source_length]`` (``source`` padded with ``pad``), its
    ``attention_mask`` (1 = token) and ``labels [target_length]`` (``target`` padded with -100), int64."""
    input_ids = np.full(source_length, pad, dtype=np.int64)
    input_ids[:source.size] = source
    attention_mask = np.zeros(source_length, dtype=np.int64)
    attention_mask[:source.size] = 1
    labels = np.full(target_length, IGNORE_INDEX, dtype=np.int64)
    labels[:target.size] = target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Seq2SeqDataset:
    """Tokenized (source, target) pairs as training samples for an encoder-decoder.

    Args:
        pairs: ``[(source ids, target ids)]`` (:func:`tokenize_pairs`: each ending with ``</s>``).
        source_length, target_length: the padded lengths; longer texts are cut to them (the last kept token
            replaced by the text's final token, so a cut text still ends with ``</s>``).
        pad: the padding id of ``input_ids``.
        num_samples: the dataset's length, in epochs over the pairs, each in its own random order drawn from
            ``seed`` (sample ``i`` is a function of ``(seed, i)``: reproducible and resumable). None: the pairs once,
            in their order (for evaluation).

    ``ds[i]`` is a dict of numpy int64 arrays: ``input_ids [source_length]`` (padded with ``pad``),
    ``attention_mask [source_length]``, ``labels [target_length]`` (-100 at padding): ``T5Model``'s keyword
    arguments. ``truncated`` counts the pairs cut to fit.
    """

    name = "megacore.data.Seq2SeqDataset"

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], source_length: int, target_length: int,
                 pad: int, num_samples: Optional[int] = None, seed: int = 0):
        for arg, value in (("source_length", source_length), ("target_length", target_length)):
            if not _is_int(value) or value < 2:
                raise ValueError(f"{self.name}: {arg}={value!r} must be an int >= 2")
        if not pairs:
            raise ValueError(f"{self.name}: no pairs")
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
            raise ValueError(f"{self.name}: num_samples={num_samples!r} must be a positive int or None")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{self.name}: seed={seed!r} must be a non-negative int")
        self.source_length, self.target_length, self.pad = int(source_length), int(target_length), int(pad)
        self.pairs = [(np.asarray(s, dtype=np.int64), np.asarray(t, dtype=np.int64)) for s, t in pairs]
        if any(s.size == 0 or t.size == 0 for s, t in self.pairs):
            raise ValueError(f"{self.name}: every source and target needs at least one token (its </s>)")
        self.truncated = sum(s.size > self.source_length or t.size > self.target_length for s, t in self.pairs)
        self.num_samples = len(self.pairs) if num_samples is None else int(num_samples)
        self.shuffle, self.seed = num_samples is not None, int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def pair_index(self, index: int) -> int:
        """Which pair sample ``index`` is."""
        if not _is_int(index):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"{self.name}: index {index} out of range for {self.num_samples} samples")
        index = int(index) % self.num_samples
        if not self.shuffle:
            return index
        epoch, position = divmod(index, len(self.pairs))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return int(self._orders[epoch][position])

    @staticmethod
    def _fit(ids: np.ndarray, length: int) -> np.ndarray:
        return ids if ids.size <= length else np.append(ids[:length - 1], ids[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        source, target = self.pairs[self.pair_index(index)]
        source, target = self._fit(source, self.source_length), self._fit(target, self.target_length)
        return encoder_decoder_item(source, target, self.source_length, self.target_length, self.pad)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pairs={len(self.pairs)}, samples={len(self)}, source_length="
                f"{self.source_length}, target_length={self.target_length}, truncated={self.truncated})")
