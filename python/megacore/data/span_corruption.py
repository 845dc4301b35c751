"""T5's span corruption (Raffel et al. 2020, section 3.1.4) as a dataset over a Megatron-format indexed dataset.

A sample is a run of consecutive sentences of one document, cut by Megatron's samples mapping (the one the
masked-LM datasets use, ``megacore.data.masked_lm``, in packed mode) to ``tokens_length`` tokens. A random
``noise_density`` of its tokens, in spans of ``mean_noise_span_length`` on average, is the noise; the encoder sees
the text with each noise span replaced by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ... in order), the
decoder predicts each sentinel followed by the span it stands for::

    text:     Thank you for inviting me to your party last week .
    input:    Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    labels:   <extra_id_0> for inviting <extra_id_1> last </s>

Exactly T5's preprocessing (``random_spans_helper``, ``random_spans_noise_mask``, ``noise_span_to_unique_sentinel``
of t5.data.preprocessors): ``round(length * noise_density)`` noise tokens (at least 1, at most length - 1) in
``round(noise / mean_noise_span_length)`` spans (at least 1); the noise and the non-noise tokens are each cut into
that many non-empty spans uniformly at random, interleaved starting with non-noise, so the text always ends with
a noise span. ``tokens_length`` is the longest text whose corrupted input, with its sentinels and ``</s>``, fits
the encoder length (512 -> 568 tokens and 114 target positions at T5's settings).

Differences from Megatron-LM's T5 dataset (``T5MaskedWordPieceDataset``): Megatron masks with its BERT masking
machinery (n-gram spans drawn from a geometric distribution, whole words) and puts a ``[bos]`` in the decoder input;
megacore follows T5's paper and code, as transformers' T5 checkpoints were trained (the decoder input is the labels
shifted right behind the pad id, as ``T5Model`` and transformers do), and its documents' sentences are whole
sequences of the indexed dataset. Like the masked-LM datasets, sample ``i`` is a function of ``(seed, i)`` alone, so
runs are reproducible, resumable at any sample and independent of DataLoader workers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megacore.data.masked_lm import SentenceSamples, _is_int
from megacore.data.seq2seq import encoder_decoder_item

__all__ = ["SpanCorruptionDataset", "random_spans_noise_mask", "span_corruption_lengths"]

_NAME = "megacore.data.SpanCorruptionDataset"


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a text of ``length`` tokens, as T5 counts them (round half to even)."""
    noise = int(np.round(length * noise_density))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(np.round(noise / mean_noise_span_length)), 1)
    return noise, spans


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """``(tokens_length, targets_length)``: the longest text whose corrupted input (the non-noise tokens, a sentinel
    per span and ``</s>``) is at most ``inputs_length`` tokens, and the length of its targets (a sentinel per span,
    the noise tokens and ``</s>``). T5's ``random_spans_helper``: 512 -> (568, 114). Raises ValueError for an
    ``inputs_length`` below 3."""
    if not _is_int(inputs_length) or inputs_length < 3:
        raise ValueError(f"megacore.data.span_corruption_lengths: inputs_length={inputs_length!r} must be an int >= 3")

    def lengths(tokens: int) -> tuple[int, int]:
        noise = int(np.round(tokens * noise_density))
        spans = int(np.round(noise / mean_noise_span_length))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    targets = lengths(tokens)[1]
    if noise_density == 0.5 and targets > inputs_length:  # T5's own adjustment
        tokens, targets = tokens - 1, targets - 1
    return tokens, targets


def _random_segmentation(rng: np.random.Generator, num_items: int, num_segments: int) -> np.ndarray:
    """``int64 [num_segments]``: ``num_items`` cut into ``num_segments`` non-empty parts uniformly at random."""
    first = np.zeros(num_items, dtype=np.int64)
    first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """``bool [length]``: T5's noise mask (module docstring): non-noise first, noise last, ``noise_density`` of the
    tokens in spans of ``mean_noise_span_length`` on average."""
    original = length
    length = max(length, 2)  # T5: avoids degeneracy
    noise, spans = _noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(rng, noise, spans)
    clean_lengths = _random_segmentation(rng, length - noise, spans)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)  # [2 spans]
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(starts) % 2 == 1)[:original]


def _replace_spans(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """T5's ``noise_span_to_unique_sentinel``: each span of ``noise`` becomes its sentinel (the k-th span
    ``sentinels[k]``); the other tokens are kept."""
    previous = np.concatenate([[False], noise[:-1]])
    first = noise & ~previous
    out = tokens.copy()
    out[first] = sentinels[np.cumsum(first)[first] - 1]
    return out[~(noise & previous)]


class SpanCorruptionDataset(SentenceSamples):
    """T5 span-corruption samples from an indexed dataset (module docstring).

    Args:
        indexed_dataset: an ``IndexedDataset`` (or anything with ``sequence_lengths``, ``document_indices`` and
            ``ds[i]``), best prepared with one sentence per sequence.
        tokenizer: a megacore ``Tokenizer`` (or anything with ``vocab_size``, ``pad``, ``eod`` and ``sentinels``:
            the ids of ``<extra_id_0>``, ``<extra_id_1>``, ...), e.g. from ``train_unigram``.
        max_seq_length: the encoder length: every ``input_ids`` has it (padded).
        noise_density, mean_noise_span_length: T5's 0.15 and 3.
        short_seq_prob: the probability of a shorter sample (uniform length; T5: 0).
        seed: a non-negative int; the mapping and every sample are functions of it.
        num_samples: the dataset's length (as many epochs as it needs, each reshuffled); None: one epoch.

    ``ds[i]`` is a dict of numpy int64 arrays: ``input_ids [max_seq_length]`` (padded with ``pad``),
    ``attention_mask [max_seq_length]`` (1 = token), ``labels [target_length]`` (-100 at padding). Batched, they
    are ``T5Model.forward``'s keyword arguments (it shifts the labels right into the decoder input).
    Attributes: ``tokens_length`` (the text of a full sample), ``target_length``.

    Raises ValueError for bad arguments, a tokenizer without the special tokens or with too few sentinels, or
    data too small for one sample; IndexError for an index out of range.
    """

    name = _NAME
    mode = "packed"

    def __init__(self, indexed_dataset, tokenizer, max_seq_length: int, *, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0, short_seq_prob: float = 0.0, seed: int = 1234,
                 num_samples: Optional[int] = None):
        name = self.name
        if not isinstance(noise_density, (int, float)) or isinstance(noise_density, bool) or not 0 < noise_density < 1:
            raise ValueError(f"{name}: noise_density={noise_density!r} must be in (0, 1)")
        if (not isinstance(mean_noise_span_length, (int, float)) or isinstance(mean_noise_span_length, bool)
                or mean_noise_span_length < 1):
            raise ValueError(f"{name}: mean_noise_span_length={mean_noise_span_length!r} must be >= 1")
        if not _is_int(max_seq_length) or max_seq_length < 3:
            raise ValueError(f"{name}: max_seq_length={max_seq_length!r} must be an int >= 3 (a token, a sentinel "
                             "and </s>)")
        self.noise_density, self.mean_noise_span_length = float(noise_density), float(mean_noise_span_length)
        self.max_seq_length = int(max_seq_length)
        self.tokens_length, self.target_length = span_corruption_lengths(self.max_seq_length, self.noise_density,
                                                                         self.mean_noise_span_length)
        self.max_num_tokens = self.tokens_length
        self._read_tokenizer(tokenizer)
        self._setup_samples(indexed_dataset, short_seq_prob, seed, num_samples)

    def _read_tokenizer(self, tokenizer) -> None:
        name = self.name
        vocab_size = self._read_vocab_size(tokenizer)
        for attr in ("pad", "eod"):
            value = getattr(tokenizer, attr, None)
            if not _is_int(value) or not 0 <= value < vocab_size:
                raise ValueError(f"{name}: tokenizer.{attr}={value!r} must be a token id in [0, vocab_size="
                                 f"{vocab_size}); span corruption needs the {'padding' if attr == 'pad' else '</s>'} "
                                 "token")
        self.pad_id, self.eod_id = int(tokenizer.pad), int(tokenizer.eod)
        sentinels = np.asarray(list(getattr(tokenizer, "sentinels", None) or []), dtype=np.int64)
        _, spans = _noise_counts(self.tokens_length, self.noise_density, self.mean_noise_span_length)
        if sentinels.size < spans:
            raise ValueError(f"{name}: the tokenizer has {sentinels.size} sentinel tokens; samples of "
                             f"{self.tokens_length} tokens (max_seq_length {self.max_seq_length}) have up to {spans} "
                             "noise spans (train one with megacore.data.train_unigram(sentinels=...) or "
                             "`megacore prepare --train-tokenizer unigram`)")
        if ((sentinels < 0) | (sentinels >= vocab_size)).any() or np.isin(sentinels, [self.pad_id, self.eod_id]).any():
            raise ValueError(f"{name}: tokenizer.sentinels must be ids in [0, vocab_size) other than pad and eod")
        self.sentinels = sentinels

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(text, noise mask, (inputs, targets))`` of sample ``index`` before padding: the text's tokens, T5's
        noise mask over them, and the corrupted input and the targets, each ending with ``</s>``."""
        index = self._check_index(index)
        first, end, target, _ = (int(v) for v in self.samples_mapping[index])
        text = self._spans(first, end)[:target]
        rng = np.random.default_rng([self.seed, 1, index])
        noise = random_spans_noise_mask(text.size, self.noise_density, self.mean_noise_span_length, rng)
        eos = np.array([self.eod_id], dtype=np.int64)
        inputs = np.concatenate([_replace_spans(text, noise, self.sentinels), eos])
        targets = np.concatenate([_replace_spans(text, ~noise, self.sentinels), eos])
        return text, noise, (inputs, targets)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        _, _, (inputs, targets) = self.sample(index)
        return encoder_decoder_item(inputs, targets, self.max_seq_length, self.target_length, self.pad_id)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={len(self)}, max_seq_length={self.max_seq_length}, "
                f"tokens_length={self.tokens_length}, target_length={self.target_length}, "
                f"noise_density={self.noise_density}, mean_noise_span_length={self.mean_noise_span_length}, "
                f"seed={self.seed}, epochs={self.num_epochs})")
