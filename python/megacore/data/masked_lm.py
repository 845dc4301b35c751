"""Masked-language-model datasets: BERT / RoBERTa (:class:`MaskedLMDataset`) and ELECTRA
(:class:`ElectraDataset`) samples from an indexed dataset.

The input is an :class:`~megacore.data.indexed.IndexedDataset` (or anything with the same reading
interface): documents made of sequences, each sequence one sentence when the data was prepared with
sentence splitting. A sample is a run of consecutive sentences of one document (Megatron's samples
mapping), turned into ``[CLS] A [SEP] B [SEP]`` (``mode="nsp"`` / ``"sop"``) or ``[CLS] A [SEP]``
(``mode="packed"``), then masked as BERT does.

Semantics, following Megatron-LM's BERT dataset (``build_mapping`` and ``build_training_sample``) with the
differences listed:

* Mapping: per document, sentences are accumulated until their length reaches a target (``max_seq_length``
  less the special tokens; with probability ``short_seq_prob`` a uniform length in ``[2, target]``),
  with at least two sentences per sample in the pair modes and never leaving a lone last sentence
  (packed mode: a lone last sentence is a sample of its own, so none is truncated away). Documents with
  too few sentences are skipped. *Differences:* sentences longer than a chunk (the target
  in packed mode, half of it in the pair modes) are split into chunks instead of Megatron's skipping
  every document that holds a sentence over 512 tokens, so data prepared without sentence splitting
  (one sequence per document) is used whole; each epoch is shuffled on its own (epoch 0's samples come
  first, then epoch 1's, ...) rather than all epochs together, so every sample is seen before any repeats.
* Pairs: A is the first ``k`` sentences (``k`` uniform in ``[1, n-1]`` for ``n >= 3`` sentences, else 1),
  B the rest. SOP: with probability 1/2 A and B are swapped. NSP: with probability 1/2 B is replaced by
  sentences from a random other document (as in Google's BERT; Megatron's "NSP" is in fact the swap).
  ``next_sentence_label`` follows Hugging Face: 0 = B is A's continuation, 1 = B is random / swapped.
* Truncation to the target: the longer segment loses one token at a time, from its front or its back
  with equal probability (Megatron's ``truncate_segments``, computed in closed form).
* Masking: ``round(masked_lm_prob * n)`` of the ``n`` maskable tokens (everything but [CLS] / [SEP]) are
  chosen, whole words at a time with ``whole_word_masking`` (a word that would overflow the count is
  skipped, as in BERT); each chosen token becomes [MASK] / a random token / itself with the probabilities
  ``mask_replace_probs`` (BERT's 80/10/10). *Differences:* ``n`` excludes the special tokens (Megatron
  counts them); random replacements are drawn from the vocabulary without the special tokens, so a
  sample's structure ([CLS], [SEP], padding) is never imitated; a word after a [SEP] always starts a new
  word group.
* Randomness: the mapping is a function of ``seed`` (and the data); sample ``i`` is a function of
  ``(seed, i)`` alone (a numpy Generator seeded with both), so it is reproducible and does not depend on the
  order in which DataLoader workers ask for samples.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = ["MaskedLMDataset", "ElectraDataset", "SentenceSamples", "word_starts", "build_samples_mapping"]

_NAME = "megacore.data.MaskedLMDataset"
MODES = ("nsp", "sop", "packed")
IGNORE_INDEX = -100  # the label of positions that are not predicted (torch's cross_entropy default)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _numbers(values) -> bool:
    try:
        return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)
    except TypeError:
        return False


def word_starts(tokenizer) -> np.ndarray:
    """Which token ids start a word, ``bool [vocab_size]``, from a tokenizer's vocabulary.

    A megacore ``Tokenizer`` answers with its own ``word_starts()``. Otherwise this needs
    ``tokenizer.id_to_token(i)`` (e.g. a Hugging Face ``tokenizers.Tokenizer``;
    a wrapper exposing the latter as ``.tokenizer`` also works) and ``tokenizer.kind``:
    ``"wordpiece"``: tokens not starting with ``"##"``; ``"bpe"`` (byte-level, GPT-2 / RoBERTa): tokens
    starting with ``"Ġ"`` (a leading space); ``"sentencepiece"`` / ``"unigram"``: tokens starting with
    ``"▁"``. Special tokens and ids without a token count as word starts.

    Raises ValueError when the tokenizer has no ``id_to_token`` or an unknown ``kind``.
    """
    if callable(getattr(tokenizer, "word_starts", None)):  # megacore's Tokenizer knows its own rule
        return np.asarray(tokenizer.word_starts(), dtype=bool)
    lookup = getattr(tokenizer, "id_to_token", None)
    if lookup is None and hasattr(tokenizer, "tokenizer"):
        lookup = getattr(tokenizer.tokenizer, "id_to_token", None)
    if lookup is None:
        raise ValueError("megacore.data.word_starts: the tokenizer has no id_to_token; pass is_word_start "
                         "(a bool array [vocab_size] or a callable) instead")
    kind = str(getattr(tokenizer, "kind", "wordpiece")).lower()
    if kind == "wordpiece":
        starts = lambda t: not t.startswith("##")  # noqa: E731
    elif kind in ("bpe", "byte_level_bpe", "bytelevel"):
        starts = lambda t: t.startswith("Ġ")  # noqa: E731
    elif kind in ("sentencepiece", "unigram", "spm"):
        starts = lambda t: t.startswith("▁")  # noqa: E731
    else:
        raise ValueError(f"megacore.data.word_starts: tokenizer kind {kind!r} has no known word-start rule; "
                         "pass is_word_start (a bool array [vocab_size] or a callable) instead")
    out = np.ones(int(tokenizer.vocab_size), dtype=bool)
    for i in range(out.size):
        token = lookup(i)
        out[i] = token is None or starts(token)
    for name in ("cls", "sep", "mask", "pad", "eod"):
        special = getattr(tokenizer, name, None)
        if special is not None and 0 <= special < out.size:
            out[special] = True
    return out


def _target_lengths(rng: np.random.Generator, count: int, max_num_tokens: int, short_seq_prob: float) -> np.ndarray:
    """``int64 [count]`` sample target lengths: ``max_num_tokens``, or with probability ``short_seq_prob`` a
    uniform length in ``[2, max_num_tokens]`` (BERT's short sequences, which fine-tuning tasks often have)."""
    targets = np.full(count, max_num_tokens, dtype=np.int64)
    if short_seq_prob > 0:
        short = rng.random(count) < short_seq_prob
        targets[short] = rng.integers(2, max_num_tokens + 1, size=int(short.sum()))
    return targets


def build_samples_mapping(span_lengths: np.ndarray, doc_span_starts: np.ndarray, min_sentences: int,
                          max_num_tokens: int, short_seq_prob: float, rng: np.random.Generator) -> np.ndarray:
    """One epoch of Megatron's samples mapping, in document order (not shuffled).

    Args:
        span_lengths: ``int64 [spans]`` the length of each sentence (span), > 0.
        doc_span_starts: ``int64 [docs + 1]`` the first span of each document; the last entry = spans.
        min_sentences: fewest sentences in a sample (2 for sentence pairs, 1 for packed segments);
            documents with fewer are skipped.
        max_num_tokens: the target length of a sample (without special tokens).
        short_seq_prob: probability of a shorter, uniform target in ``[2, max_num_tokens]``.
        rng: draws the targets.

    Returns ``int64 [samples, 4]``: ``(first span, end span (exclusive), target length, document)``.

    A sample ends at the first sentence where its length reaches the target, it has ``min_sentences``
    sentences and at least ``min_sentences`` sentences of the document remain; otherwise at the document's
    end. (Megatron always keeps two remaining; packed segments need one, so no data is truncated away.) All
    documents advance together (one vectorized step per sample of the longest document).
    """
    doc_span_starts = np.asarray(doc_span_starts, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(span_lengths, dtype=np.int64)])  # [spans + 1]
    firsts, lasts = doc_span_starts[:-1], doc_span_starts[1:]
    docs = np.flatnonzero(lasts - firsts >= min_sentences)  # [eligible]
    start, last = firsts[docs].copy(), lasts[docs]
    pieces = []
    active = np.arange(docs.size)
    while active.size:
        s, end_of_doc = start[active], last[active]
        target = _target_lengths(rng, active.size, max_num_tokens, short_seq_prob)
        # first end e with length(s..e) >= target, and at least min_sentences sentences
        end = np.maximum(np.searchsorted(cumulative, cumulative[s] + target, side="left"), s + min_sentences)
        # a cut must leave enough sentences for another sample (two for a pair); else take the rest
        end = np.where(end <= end_of_doc - min_sentences, end, end_of_doc)
        pieces.append(np.stack([s, end, target, docs[active]], axis=1))
        start[active] = end
        active = active[end < end_of_doc]
    if not pieces:
        return np.zeros((0, 4), dtype=np.int64)
    mapping = np.concatenate(pieces)
    return mapping[np.argsort(mapping[:, 0], kind="stable")]


class SentenceSamples:
    """What the sentence-based datasets share (:class:`MaskedLMDataset`, :class:`ElectraDataset`,
    ``megacore.data.SpanCorruptionDataset``): sentences as spans, Megatron's samples mapping over them (module
    docstring), reading a sample's tokens, index checks. A subclass sets ``name``, ``mode``, ``max_num_tokens``,
    ``vocab_size`` and ``eod_id`` (None: keep every token), then calls :meth:`_setup_samples`."""

    name = "megacore.data.SentenceSamples"

    def _read_vocab_size(self, tokenizer) -> int:
        """``tokenizer.vocab_size``, checked, as ``self.vocab_size`` (span tokens are checked against it)."""
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"{self.name}: tokenizer.vocab_size={vocab_size!r} must be a positive int")
        self.vocab_size = int(vocab_size)
        return self.vocab_size

    def _setup_samples(self, indexed_dataset, short_seq_prob: float, seed: int, num_samples: Optional[int]) -> None:
        name = self.name
        if not isinstance(short_seq_prob, (int, float)) or not 0 <= short_seq_prob <= 1:
            raise ValueError(f"{name}: short_seq_prob={short_seq_prob!r} must be in [0, 1]")
        self.short_seq_prob = float(short_seq_prob)
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{name}: seed={seed!r} must be a non-negative int")
        self.seed = int(seed)
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
            raise ValueError(f"{name}: num_samples={num_samples!r} must be a positive int or None (one epoch)")
        self.indexed_dataset = indexed_dataset
        self._build_spans(indexed_dataset)
        self._build_mapping(num_samples)

    def _build_spans(self, ds) -> None:
        """Sentences as spans ``(sequence, offset, length)``; sequences longer than a chunk become several
        spans, so long sentences (or whole unsplit documents) are used instead of dropped."""
        name = self.name
        try:
            lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
            doc_index = np.asarray(ds.document_indices, dtype=np.int64)
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{name}: indexed_dataset needs sequence_lengths and document_indices arrays "
                             f"(an IndexedDataset); got {type(ds).__name__} ({e})") from None
        n = lengths.size
        if (lengths.ndim != 1 or doc_index.ndim != 1 or doc_index.size < 1 or doc_index[0] != 0
                or doc_index[-1] != n or (np.diff(doc_index) < 0).any() or (lengths < 0).any()):
            raise ValueError(f"{name}: indexed_dataset's index is inconsistent: document_indices must rise from "
                             f"0 to the sequence count ({n}) and sequence_lengths be non-negative")
        chunk = self.max_num_tokens if self.mode == "packed" else max(1, self.max_num_tokens // 2)
        pieces = -(-lengths // chunk)  # [n] spans per sequence (0 for an empty sequence)
        if self.eod_id is not None:
            # a sequence holding only the EOD token (GPT-prepared data) is no sentence
            single = np.flatnonzero(lengths == 1)
            pieces[single[[int(np.asarray(ds[int(k)])[0]) == self.eod_id for k in single]]] = 0
        self._span_sequence = np.repeat(np.arange(n, dtype=np.int64), pieces)  # [spans]
        first_span = np.concatenate([[0], np.cumsum(pieces)])  # [n + 1]
        piece = np.arange(self._span_sequence.size, dtype=np.int64) - first_span[self._span_sequence]
        self._span_offset = piece * chunk
        self._span_length = np.minimum(chunk, lengths[self._span_sequence] - self._span_offset)
        self._doc_span_starts = first_span[doc_index]  # [docs + 1]
        self._doc_is_nonempty = np.diff(self._doc_span_starts) > 0
        if self.mode == "nsp" and self._doc_is_nonempty.sum() < 2:
            raise ValueError(f"{name}: mode='nsp' needs at least two non-empty documents (random next "
                             f"sentences come from another document); the dataset has "
                             f"{int(self._doc_is_nonempty.sum())}")
        self._nonempty_docs = np.flatnonzero(self._doc_is_nonempty)

    def _build_mapping(self, num_samples: Optional[int]) -> None:
        min_sentences = 1 if self.mode == "packed" else 2
        epochs, total = [], 0
        while not epochs or (num_samples is not None and total < num_samples):
            rng = np.random.default_rng([self.seed, 0, len(epochs)])
            epoch = build_samples_mapping(self._span_length, self._doc_span_starts, min_sentences,
                                          self.max_num_tokens, self.short_seq_prob, rng)
            if epoch.shape[0] == 0:
                raise ValueError(f"{self.name}: no sample can be made: no document has {min_sentences} or more "
                                 f"sentences (mode={self.mode!r}; the pair modes need documents of several "
                                 "sentences: prepare the data with sentence splitting, or use mode='packed')")
            epochs.append(epoch[rng.permutation(epoch.shape[0])])
            total += epoch.shape[0]
        mapping = np.concatenate(epochs)
        #: ``int64 [len, 4]``: first span, end span, target length, document of every sample
        self.samples_mapping = mapping if num_samples is None else mapping[:num_samples]
        self.num_epochs = len(epochs)

    def __len__(self) -> int:
        return int(self.samples_mapping.shape[0])

    def _span_tokens(self, span: int) -> np.ndarray:
        sequence = int(self._span_sequence[span])
        tokens = np.asarray(self.indexed_dataset[sequence])
        offset = int(self._span_offset[span])
        tokens = tokens[offset:offset + int(self._span_length[span])].astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.name}: sequence {sequence} holds token ids outside [0, vocab_size="
                             f"{self.vocab_size}) (was the data prepared with another tokenizer?)")
        if self.eod_id is not None:
            tokens = tokens[tokens != self.eod_id]
        return tokens

    def _spans(self, first: int, end: int) -> np.ndarray:
        parts = [self._span_tokens(k) for k in range(first, end)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _check_index(self, index) -> int:
        """``index`` as a non-negative int; TypeError / IndexError naming the dataset otherwise."""
        if not _is_int(index):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} samples")
        return int(index) % n


class MaskedLMDataset(SentenceSamples):
    """BERT / RoBERTa masked-LM samples (see the module docstring for the exact semantics).

    Args:
        indexed_dataset: an ``IndexedDataset``, or any object with ``sequence_lengths`` (int [n]),
            ``document_indices`` (int [docs + 1], the first sequence of each document, last = n) and
            ``ds[i]`` (the tokens of sequence i, a 1-D integer array).
        tokenizer: any object with ``vocab_size`` and the special ids ``cls``, ``sep``, ``mask``, ``pad``
            (a megacore ``Tokenizer``); an ``eod`` id, when it has one, is removed from the text (data
            prepared for GPT ends every document with it).
        max_seq_length: the length of every sample (padded to it).
        mode: ``"nsp"`` (next-sentence prediction: B random half the time), ``"sop"`` (sentence order: A
            and B swapped half the time) or ``"packed"`` (one segment of consecutive sentences, no label:
            RoBERTa).
        masked_lm_prob: the fraction of the maskable tokens to predict.
        mask_replace_probs: the probabilities that a predicted token is replaced by [MASK], by a random
            token, or kept; BERT's ``(0.8, 0.1, 0.1)``.
        whole_word_masking: mask whole words (all their pieces or none).
        is_word_start: which ids start a word: a bool array ``[vocab_size]``, or a callable taking an int64
            array of ids and returning a bool array of its shape (called once on all ids). None with
            ``whole_word_masking``: :func:`word_starts` of the tokenizer (WordPiece: not ``"##..."``).
        short_seq_prob: the probability of a shorter target length (Megatron's 0.1).
        seed: a non-negative int; the mapping and every sample are functions of it.
        num_samples: the dataset's length; as many epochs (each reshuffled, with new target lengths) as it
            needs. None: one epoch.

    ``ds[i]`` returns a dict of numpy int64 arrays, all ``[max_seq_length]``: ``input_ids`` (masked),
    ``token_type_ids`` (0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``, 0 at padding), ``attention_mask``
    (1 = token, 0 = padding), ``labels`` (the original id at predicted positions, -100 elsewhere); and in the
    pair modes ``next_sentence_label`` (int64 scalar: 0 = B continues A, 1 = B random / swapped). Batched
    by torch's default collate, they are ``BertModel.forward``'s keyword arguments.

    Raises ValueError for bad arguments, a dataset whose index is inconsistent, or data too small for one
    sample; IndexError for an index out of range.
    """

    name = _NAME

    def __init__(self, indexed_dataset, tokenizer, max_seq_length: int, *, mode: str = "nsp",
                 masked_lm_prob: float = 0.15, mask_replace_probs: Sequence[float] = (0.8, 0.1, 0.1),
                 whole_word_masking: bool = False,
                 is_word_start: Union[np.ndarray, Callable[[np.ndarray], np.ndarray], None] = None,
                 short_seq_prob: float = 0.1, seed: int = 1234, num_samples: Optional[int] = None):
        name = self.name
        if mode not in MODES:
            raise ValueError(f"{name}: mode={mode!r}, expected one of {MODES}")
        self.mode = mode
        self._read_tokenizer(tokenizer)
        specials = 2 if mode == "packed" else 3  # [CLS] A [SEP] (B [SEP])
        smallest = specials + 2  # a target of at least 2 text tokens (one per segment in the pair modes)
        if not _is_int(max_seq_length) or max_seq_length < smallest:
            raise ValueError(f"{name}: max_seq_length={max_seq_length!r} must be an int >= {smallest} in mode "
                             f"{mode!r} ({specials} special tokens and at least 2 text tokens)")
        self.max_seq_length = int(max_seq_length)
        self.max_num_tokens = self.max_seq_length - specials
        if not isinstance(masked_lm_prob, (int, float)) or not 0 < masked_lm_prob <= 1:
            raise ValueError(f"{name}: masked_lm_prob={masked_lm_prob!r} must be in (0, 1]")
        self.masked_lm_prob = float(masked_lm_prob)
        probs = np.asarray(mask_replace_probs, dtype=np.float64) if _numbers(mask_replace_probs) else None
        if probs is None or probs.shape != (3,) or (probs < 0).any() or abs(probs.sum() - 1) > 1e-6:
            raise ValueError(f"{name}: mask_replace_probs={mask_replace_probs!r} must be three probabilities "
                             "([MASK], random token, keep) summing to 1")
        self.mask_replace_probs = tuple(float(p) for p in probs)
        self.whole_word_masking = bool(whole_word_masking)
        self.is_word_start = self._word_start_table(tokenizer, is_word_start) if whole_word_masking else None
        # Random replacements never imitate the structure: specials are left out.
        self._random_ids = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64),
                                        [t for t in self._specials if t is not None])
        if self._random_ids.size == 0:
            raise ValueError(f"{name}: the vocabulary (vocab_size={self.vocab_size}) has no ids besides the "
                             "special tokens")
        self._setup_samples(indexed_dataset, short_seq_prob, seed, num_samples)

    # -- construction -------------------------------------------------------------------------------

    def _read_tokenizer(self, tokenizer) -> None:
        name = self.name
        vocab_size = self._read_vocab_size(tokenizer)
        for attr in ("cls", "sep", "mask", "pad"):
            value = getattr(tokenizer, attr, None)
            if not _is_int(value) or not 0 <= value < vocab_size:
                raise ValueError(f"{name}: tokenizer.{attr}={value!r} must be a token id in [0, vocab_size="
                                 f"{vocab_size}) (the [{attr.upper()}] token); masked-LM data needs it")
            setattr(self, f"{attr}_id", int(value))
        # The end-of-document id that data preparation appends (``append_eod``) is no text: it is removed. For a
        # WordPiece tokenizer it is [SEP] itself, which a sentence's tokens otherwise never hold (the separators
        # are the dataset's to place), so a paragraph's last sentence does not carry a stray [SEP].
        eod = getattr(tokenizer, "eod", None)
        self.eod_id = int(eod) if _is_int(eod) and 0 <= eod < vocab_size else None
        self._specials = (self.cls_id, self.sep_id, self.mask_id, self.pad_id, self.eod_id)

    def _word_start_table(self, tokenizer, is_word_start) -> np.ndarray:
        name = self.name
        if is_word_start is None:
            try:
                table = word_starts(tokenizer)
            except ValueError as e:
                raise ValueError(f"{name}: whole_word_masking needs to know which ids start a word ({e})") from None
        elif callable(is_word_start):
            ids = np.arange(self.vocab_size, dtype=np.int64)
            table = np.asarray(is_word_start(ids))
            if table.shape != ids.shape:
                raise ValueError(f"{name}: is_word_start(ids [{self.vocab_size}]) returned shape "
                                 f"{list(table.shape)}, expected [{self.vocab_size}]")
        else:
            table = np.asarray(is_word_start)
            if table.shape != (self.vocab_size,):
                raise ValueError(f"{name}: is_word_start has shape {list(table.shape)}, expected "
                                 f"[{self.vocab_size}] (tokenizer.vocab_size)")
        if table.dtype != np.bool_ and not np.isin(table, (0, 1)).all():
            raise ValueError(f"{name}: is_word_start must be boolean (one flag per token id)")
        return table.astype(bool)

    # -- samples ------------------------------------------------------------------------------------

    def _random_segment(self, rng: np.random.Generator, doc: int, length: int) -> np.ndarray:
        """Sentences from a random document other than ``doc``, from a random sentence on, until ``length``
        tokens or the document's end (BERT's random next sentence)."""
        position = int(np.searchsorted(self._nonempty_docs, doc))
        pick = int(rng.integers(0, self._nonempty_docs.size - 1))
        other = int(self._nonempty_docs[pick + (pick >= position)])
        first, last = int(self._doc_span_starts[other]), int(self._doc_span_starts[other + 1])
        start = int(rng.integers(first, last))
        reached = np.cumsum(self._span_length[start:last]) >= length
        end = start + (int(np.argmax(reached)) + 1 if reached.any() else last - start)
        return self._spans(start, end)

    def _segments(self, rng: np.random.Generator, first: int, end: int, target: int, doc: int):
        """``(A, B, label)``: the sample's sentences as one or two segments (B empty and label None in packed
        mode)."""
        if self.mode == "packed":
            return self._spans(first, end), np.zeros(0, dtype=np.int64), None
        count = end - first
        split = first + (int(rng.integers(1, count)) if count >= 3 else 1)
        a, b = self._spans(first, split), self._spans(split, end)
        label = int(rng.random() < 0.5)
        if label and self.mode == "sop":
            a, b = b, a
        elif label:  # nsp
            b = self._random_segment(rng, doc, max(1, target - a.size))
        if a.size == 0 or b.size == 0:  # only possible when EOD removal emptied a sentence
            both = np.concatenate([a, b])
            half = max(1, both.size // 2)
            a, b = both[:half], both[half:]
        return a, b, label

    @staticmethod
    def _truncate(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, max_num_tokens: int):
        """Megatron's ``truncate_segments`` in closed form: the longer segment (B on ties) loses a token until
        the two fit; each lost token comes from the front or the back with probability 1/2."""
        la, lb = a.size, b.size
        excess = la + lb - max_num_tokens
        if excess <= 0:
            return a, b
        gap = abs(la - lb)
        if gap >= excess:
            cut_a, cut_b = (excess, 0) if la > lb else (0, excess)
        else:  # the longer one comes down to the other's length, then they alternate starting with B
            rest = excess - gap
            cut_a = (gap if la > lb else 0) + rest // 2
            cut_b = (gap if lb > la else 0) + rest - rest // 2
        front_a, front_b = rng.binomial(cut_a, 0.5), rng.binomial(cut_b, 0.5)
        return a[front_a:la - (cut_a - front_a)], b[front_b:lb - (cut_b - front_b)]

    def _mask(self, rng: np.random.Generator, tokens: np.ndarray, maskable: np.ndarray):
        """Chooses and replaces the predicted tokens. ``tokens`` int64 [t] (with specials), ``maskable`` bool
        [t]. Returns ``(input_ids [t], labels [t], predicted bool [t])``."""
        positions = np.flatnonzero(maskable)  # [m]
        count = max(1, int(round(positions.size * self.masked_lm_prob))) if positions.size else 0
        predicted = np.zeros(tokens.size, dtype=bool)
        if count:
            if self.whole_word_masking:
                # a word starts at a word-start id or right after a special token
                starts = self.is_word_start[tokens[positions]]
                starts[0] = True
                starts[1:] |= np.diff(positions) > 1
                word_first = np.flatnonzero(starts)  # [words] index into positions
                word_len = np.diff(np.append(word_first, positions.size))
                order = rng.permutation(word_first.size)
                lengths = word_len[order]
                # BERT's greedy pass: take words in random order, skipping any that would overflow the count
                # (lengths > 0: the words that fit are a prefix, then a few shorter ones further on)
                fit = int(np.searchsorted(np.cumsum(lengths), count, side="right"))
                budget = count - int(lengths[:fit].sum())
                chosen = list(range(fit))
                for k in range(fit + 1, lengths.size):
                    if budget == 0:
                        break
                    if lengths[k] <= budget:
                        chosen.append(k)
                        budget -= int(lengths[k])
                for word in order[chosen]:
                    predicted[positions[word_first[word]:word_first[word] + word_len[word]]] = True
            else:
                predicted[rng.choice(positions, size=count, replace=False)] = True
        labels = np.full(tokens.size, IGNORE_INDEX, dtype=np.int64)
        labels[predicted] = tokens[predicted]
        inputs = tokens.copy()
        where = np.flatnonzero(predicted)
        kind = rng.choice(3, size=where.size, p=self.mask_replace_probs)  # 0 [MASK], 1 random, 2 keep
        inputs[where[kind == 0]] = self.mask_id
        random_at = where[kind == 1]
        inputs[random_at] = self._random_ids[rng.integers(0, self._random_ids.size, size=random_at.size)]
        return inputs, labels, predicted

    def _sample(self, index: int) -> dict[str, Any]:
        """The unpadded parts of sample ``index``: tokens, token types, masked inputs, labels, NSP label."""
        index = self._check_index(index)
        first, end, target, doc = (int(v) for v in self.samples_mapping[index])
        rng = np.random.default_rng([self.seed, 1, index])
        a, b, label = self._segments(rng, first, end, target, doc)
        a, b = self._truncate(rng, a, b, target)
        cls, sep = np.array([self.cls_id]), np.array([self.sep_id])
        if self.mode == "packed":
            tokens = np.concatenate([cls, a, sep])  # [t]
            types = np.zeros(tokens.size, dtype=np.int64)
        else:
            tokens = np.concatenate([cls, a, sep, b, sep])
            types = np.concatenate([np.zeros(a.size + 2, dtype=np.int64), np.ones(b.size + 1, dtype=np.int64)])
        maskable = np.ones(tokens.size, dtype=bool)
        maskable[[0, a.size + 1, tokens.size - 1]] = False
        inputs, labels, _ = self._mask(rng, tokens, maskable)
        return dict(tokens=tokens, types=types, inputs=inputs, labels=labels, label=label)

    def _pad(self, values: np.ndarray, fill: int) -> np.ndarray:
        out = np.full(self.max_seq_length, fill, dtype=np.int64)  # [max_seq_length]
        out[:values.size] = values
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s = self._sample(index)
        item = {"input_ids": self._pad(s["inputs"], self.pad_id),
                "token_type_ids": self._pad(s["types"], 0),
                "attention_mask": self._pad(np.ones(s["tokens"].size, dtype=np.int64), 0),
                "labels": self._pad(s["labels"], IGNORE_INDEX)}
        if s["label"] is not None:
            item["next_sentence_label"] = np.int64(s["label"])
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={len(self)}, max_seq_length={self.max_seq_length}, "
                f"mode={self.mode!r}, masked_lm_prob={self.masked_lm_prob}, "
                f"whole_word_masking={self.whole_word_masking}, seed={self.seed}, epochs={self.num_epochs})")


class ElectraDataset(MaskedLMDataset):
    """ELECTRA pre-training samples: the generator's masked input and the original tokens.

    Takes :class:`MaskedLMDataset`'s arguments, with ELECTRA's defaults: ``mode="packed"`` (ELECTRA has no
    sentence-level task) and ``mask_replace_probs=(1.0, 0.0, 0.0)``: every predicted token becomes [MASK],
    the paper's ``x_masked = REPLACE(x, m, [MASK])`` (Clark et al. 2020, section 2) and what
    ``megacore.models.ElectraModel`` documents; pass BERT's ``(0.8, 0.1, 0.1)`` to mix in random / kept
    tokens (the model handles either: it rebuilds the original from ``mlm_labels``).

    ``ds[i]`` returns a dict of numpy int64 arrays ``[max_seq_length]``: ``input_ids`` (masked),
    ``original_ids`` (the unmasked tokens; equal to ``input_ids`` wherever ``mlm_labels`` is -100),
    ``attention_mask``, ``token_type_ids``, ``mlm_labels`` (the original id at predicted positions, -100
    elsewhere); in the pair modes also ``next_sentence_label``. ``ElectraModel.forward`` takes all but
    ``original_ids`` (and ``next_sentence_label``) as keyword arguments.
    """

    name = "megacore.data.ElectraDataset"

    def __init__(self, indexed_dataset, tokenizer, max_seq_length: int, *, mode: str = "packed",
                 mask_replace_probs: Sequence[float] = (1.0, 0.0, 0.0), **kwargs):
        super().__init__(indexed_dataset, tokenizer, max_seq_length, mode=mode,
                         mask_replace_probs=mask_replace_probs, **kwargs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s = self._sample(index)
        item = {"input_ids": self._pad(s["inputs"], self.pad_id),
                "original_ids": self._pad(s["tokens"], self.pad_id),
                "attention_mask": self._pad(np.ones(s["tokens"].size, dtype=np.int64), 0),
                "token_type_ids": self._pad(s["types"], 0),
                "mlm_labels": self._pad(s["labels"], IGNORE_INDEX)}
        if s["label"] is not None:
            item["next_sentence_label"] = np.int64(s["label"])
        return item
