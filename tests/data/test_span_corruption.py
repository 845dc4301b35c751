"""megacore.data.SpanCorruptionDataset: T5's span corruption against its definition (the noise-mask statistics, the
sentinel layout: inputs and targets rebuild the text), T5's length rule, determinism and resumability, errors."""

from __future__ import annotations

import numpy as np
import pytest

from megacore.data import SpanCorruptionDataset, random_spans_noise_mask, span_corruption_lengths

PAD, EOS, VOCAB, SENTINELS = 0, 1, 400, 100


class _Tokenizer:
    vocab_size, pad, eod = VOCAB, PAD, EOS
    sentinels = list(range(VOCAB - 1, VOCAB - 1 - SENTINELS, -1))  # <extra_id_0> last, as T5


class _Indexed:
    """Documents of sentences of ids in [3, 300), each document ending with EOS (as `megacore prepare` writes)."""

    def __init__(self, docs: list[list[int]], seed: int = 0):
        rng = np.random.default_rng(seed)
        self.seqs, starts = [], [0]
        for sentences in docs:
            for k, n in enumerate(sentences):
                seq = rng.integers(3, 300, n)
                self.seqs.append(np.append(seq, EOS) if k == len(sentences) - 1 else seq)
            starts.append(len(self.seqs))
        self.sequence_lengths = np.array([len(s) for s in self.seqs])
        self.document_indices = np.array(starts)

    def __getitem__(self, i):
        return self.seqs[i]


def _rebuild(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int]) -> np.ndarray:
    """The text from a corrupted input and its targets, by the definition: sentinel k in the input stands for
    the tokens after sentinel k in the targets."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = sentinels.index(t)
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[sentinels.index(t)] if t in sentinels else [t])
    return np.array(out)


def test_the_lengths_follow_t5s_random_spans_helper():
    assert span_corruption_lengths(512) == (568, 114)  # T5's published setting: 568 tokens, targets 114
    for inputs in (3, 16, 64, 128, 256, 512, 1000):
        tokens, targets = span_corruption_lengths(inputs)
        noise = round(tokens * 0.15)
        spans = round(noise / 3)
        assert tokens - noise + spans + 1 <= inputs  # the corrupted input fits
        more = tokens + 1
        assert more - round(more * 0.15) + round(round(more * 0.15) / 3) + 1 > inputs  # and is the longest
        assert targets == noise + spans + 1
    with pytest.raises(ValueError, match="inputs_length=2 must be an int >= 3"):
        span_corruption_lengths(2)


def test_the_noise_mask_has_t5s_density_span_count_and_layout():
    rng = np.random.default_rng(0)
    for length in (2, 5, 10, 57, 568):
        for _ in range(50):
            mask = random_spans_noise_mask(length, 0.15, 3.0, rng)
            noise = min(max(int(np.round(length * 0.15)), 1), length - 1)
            spans = max(int(np.round(noise / 3.0)), 1)
            assert mask.shape == (length,) and mask.sum() == noise
            starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
            assert starts.size == spans  # exactly that many noise spans, each non-empty
            assert not mask[0] and mask[-1]  # non-noise first, noise last
    # the span lengths are spread: over many masks of 568 tokens the mean noise span length is 85 / 28
    lengths = []
    for _ in range(200):
        mask = random_spans_noise_mask(568, 0.15, 3.0, rng)
        edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
        lengths.extend(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert np.mean(lengths) == pytest.approx(85 / 28) and max(lengths) > 6 and min(lengths) == 1


def _dataset(**kwargs) -> SpanCorruptionDataset:
    docs = [[12, 30, 7, 25], [40, 40], [9], [50, 3, 3, 20, 11], [33, 33, 33]]
    return SpanCorruptionDataset(_Indexed(docs), _Tokenizer(), kwargs.pop("max_seq_length", 48), seed=3, **kwargs)


def test_inputs_and_targets_follow_the_sentinel_layout_and_rebuild_the_text():
    ds = _dataset()
    assert (ds.tokens_length, ds.target_length) == span_corruption_lengths(48)
    sentinels = _Tokenizer.sentinels
    for i in range(len(ds)):
        text, noise, (inputs, targets) = ds.sample(i)
        assert 0 < text.size <= ds.tokens_length and EOS not in text  # the documents' EOS is not text
        spans = int((noise & ~np.concatenate([[False], noise[:-1]])).sum())
        # the k-th noise span becomes <extra_id_k> (sentinels[k]) in the input; the targets list each in order
        assert [t for t in inputs if t in sentinels] == sentinels[:spans]
        assert [t for t in targets if t in sentinels] == sentinels[:spans] and targets[0] == sentinels[0]
        assert inputs.size == text.size - noise.sum() + spans + 1 and targets.size == noise.sum() + spans + 1
        np.testing.assert_array_equal(_rebuild(inputs, targets, sentinels), text)
        item = ds[i]
        assert item["input_ids"].shape == (48,) and item["labels"].shape == (ds.target_length,)
        n = inputs.size
        np.testing.assert_array_equal(item["input_ids"][:n], inputs)
        assert (item["input_ids"][n:] == PAD).all() and item["attention_mask"].tolist() == [1] * n + [0] * (48 - n)
        np.testing.assert_array_equal(item["labels"][:targets.size], targets)
        assert (item["labels"][targets.size:] == -100).all()
        assert all(v.dtype == np.int64 for v in item.values())


def test_samples_are_deterministic_and_independent_of_the_order_they_are_read_in():
    a, b = _dataset(num_samples=40), _dataset(num_samples=40)
    order = np.random.default_rng(1).permutation(40)
    for i in order:
        for key in ("input_ids", "labels"):
            np.testing.assert_array_equal(a[int(i)][key], b[int(i)][key])
    np.testing.assert_array_equal(a[-1]["labels"], a[39]["labels"])
    other = SpanCorruptionDataset(a.indexed_dataset, _Tokenizer(), 48, seed=4, num_samples=40)
    assert any(not np.array_equal(a[i]["input_ids"], other[i]["input_ids"]) for i in range(40))
    assert a.num_epochs > 1 and len(a) == 40  # epochs are appended, each reshuffled


def test_every_sentence_is_used_once_per_epoch():
    ds = _dataset(max_seq_length=16)
    used = sorted(s for first, end, _, _ in ds.samples_mapping for s in range(first, end))
    assert used == list(range(len(ds._span_length)))


def test_bad_arguments_and_tokenizers_are_refused():
    indexed = _Indexed([[10, 10]])
    with pytest.raises(ValueError, match="noise_density=0 must be in"):
        SpanCorruptionDataset(indexed, _Tokenizer(), 32, noise_density=0)
    with pytest.raises(ValueError, match="mean_noise_span_length=0.5 must be >= 1"):
        SpanCorruptionDataset(indexed, _Tokenizer(), 32, mean_noise_span_length=0.5)
    with pytest.raises(ValueError, match="max_seq_length=2 must be an int >= 3"):
        SpanCorruptionDataset(indexed, _Tokenizer(), 2)

    class Few(_Tokenizer):
        sentinels = [399, 398]

    with pytest.raises(ValueError, match=r"has 2 sentinel tokens; samples of 568 tokens .* up to 28 noise spans"):
        SpanCorruptionDataset(indexed, Few(), 512)

    class NoPad(_Tokenizer):
        pad = None

    with pytest.raises(ValueError, match=r"tokenizer.pad=None must be a token id"):
        SpanCorruptionDataset(indexed, NoPad(), 32)
    with pytest.raises(IndexError, match="out of range"):
        _dataset()[10_000]
    with pytest.raises(ValueError, match="seed=-1 must be a non-negative int"):
        SpanCorruptionDataset(indexed, _Tokenizer(), 32, seed=-1)
