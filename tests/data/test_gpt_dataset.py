"""GPTDataset, the C++ sample-index builder and the train/valid/test splits.

The sample index is checked against megacore.data.index_reference (a pure-Python builder written from
the stream-position view rather than the C++ walk), and whole samples against the definition: sample k
of the unshuffled stream is tokens [k * seq_len, k * seq_len + seq_len + 1) of the documents laid end to
end in document-index order.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from megacore import _C
from megacore.data import (
    GPTDataset,
    build_gpt_datasets,
    document_lengths,
    parse_split,
    split_documents,
    split_ranges,
)
from megacore.data import index_reference as ref


class MemoryIndexedDataset:
    """In-memory stand-in for IndexedDataset: documents are lists of sequences (1-D integer arrays)."""

    def __init__(self, documents, path_prefix=None):
        self.sequences = [np.asarray(s, dtype=np.int32) for doc in documents for s in doc]
        self.sequence_lengths = np.array([len(s) for s in self.sequences], dtype=np.int32)
        self.document_indices = np.cumsum([0] + [len(doc) for doc in documents]).astype(np.int64)
        self.path_prefix = path_prefix

    def __len__(self):
        return len(self.sequences)

    def get(self, i, offset=0, length=None):
        seq = self.sequences[i]
        end = len(seq) if length is None else offset + length
        assert 0 <= offset <= end <= len(seq), (i, offset, length, len(seq))  # reads must stay in range
        return seq[offset:end]


def random_documents(rng, num_documents, max_len=40, max_sequences=1, allow_empty=True):
    """Random-length documents whose tokens are globally unique (so every window is unambiguous)."""
    documents, next_token = [], 0
    for _ in range(num_documents):
        sequences = []
        for _ in range(int(rng.integers(1, max_sequences + 1))):
            n = int(rng.integers(0 if allow_empty else 1, max_len + 1))
            sequences.append(np.arange(next_token, next_token + n))
            next_token += n
        documents.append(sequences)
    return documents


def document_tokens(documents, d):
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in documents[d]] + [np.empty(0, np.int64)])


# ---- the C++ sample index against the pure-Python reference -------------------------------------------------


def random_index_case(rng):
    num_docs = int(rng.integers(1, 30))
    sizes = rng.integers(0, 50, num_docs)
    sizes[rng.integers(0, num_docs)] += 1  # at least one token
    epochs = int(rng.integers(1, 4))
    document_index = np.concatenate([rng.permutation(num_docs) for _ in range(epochs)]).astype(np.int32)
    return sizes.astype(np.int32), document_index, epochs, int(sizes.sum())


def test_sample_index_matches_reference_over_random_documents_epochs_and_seeds():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        sizes, document_index, epochs, tokens = random_index_case(rng)
        seq_length = int(rng.integers(1, 40))
        for drop_last in (True, False):
            for extra in (0, 1):
                args = (sizes, document_index, seq_length, epochs, tokens, drop_last, extra)
                got = _C.build_sample_index(*args)
                want = ref.build_sample_index(*args)
                assert got.dtype == np.int64 and got.shape == want.shape, (seed, drop_last, extra)
                np.testing.assert_array_equal(got, want, err_msg=f"seed {seed} drop_last {drop_last} extra {extra}")


def test_sample_index_counts_follow_megatron_formula():
    sizes = np.array([10, 7, 13], dtype=np.int32)  # 30 tokens
    index = np.arange(3, dtype=np.int32)
    assert _C.build_sample_index(sizes, index, 4, 1, 30).shape == (7 + 1, 2)  # (30 - 1) // 4
    assert _C.build_sample_index(sizes, index, 4, 1, 30, False).shape == (8 + 1, 2)  # ceil(29 / 4)
    assert _C.build_sample_index(sizes, index, 5, 1, 30, True, 0).shape == (6 + 1, 2)  # 30 // 5
    assert _C.build_sample_index(sizes, index, 30, 1, 30).shape == (0 + 1, 2)  # not even one sample


def test_sample_index_accepts_int64_and_int32_inputs_alike():
    sizes = np.array([5, 9, 3, 8], dtype=np.int64)
    index = np.array([2, 0, 3, 1], dtype=np.int64)
    a = _C.build_sample_index(sizes, index, 3, 1, 25)
    b = _C.build_sample_index(sizes.astype(np.int32), index.astype(np.int32), 3, 1, 25)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "sizes, index, seq_length, epochs, tokens, message",
    [
        ([5, 5], [0, 2], 2, 1, 10, "outside the 2 document sizes"),
        ([5, 5], [0, -1], 2, 1, 10, "outside the 2 document sizes"),
        ([5, -5], [0, 1], 2, 1, 0, "is negative"),
        ([5, 5], [0, 1], 2, 1, 11, "must equal the tokens"),
        ([5, 5], [0, 1, 0, 1], 2, 1, 10, "must equal the tokens"),  # 2 epochs of 10 given as 1
        ([5, 5], [0, 1], 0, 1, 10, "seq_length must be >= 1"),
        ([5, 5], [0, 1], 2, 0, 10, "num_epochs must be >= 1"),
    ],
)
def test_sample_index_rejects_bad_inputs_with_clear_errors(sizes, index, seq_length, epochs, tokens, message):
    for builder in (_C.build_sample_index, ref.build_sample_index):
        with pytest.raises(ValueError, match=message):
            builder(np.array(sizes), np.array(index), seq_length, epochs, tokens)


def test_sample_index_rejects_float_and_2d_arrays():
    with pytest.raises(TypeError, match="integer dtype"):
        _C.build_sample_index(np.array([5.0, 5.0]), np.array([0, 1]), 2, 1, 10)
    with pytest.raises(ValueError, match="1-D"):
        _C.build_sample_index(np.array([[5, 5]]), np.array([0, 1]), 2, 1, 10)
    with pytest.raises(ValueError, match="add_extra_token_to_sequence must be 0 or 1"):
        _C.build_sample_index(np.array([5, 5]), np.array([0, 1]), 2, 1, 10, True, 2)


# ---- GPTDataset samples ---------------------------------------------------------------------------------


def stream_of(documents, document_index):
    return np.concatenate([document_tokens(documents, int(d)) for d in document_index])


@pytest.mark.parametrize("max_sequences", [1, 4])
def test_samples_are_overlapping_windows_of_the_shuffled_document_stream(max_sequences, tmp_path):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        documents = random_documents(rng, int(rng.integers(3, 25)), max_sequences=max_sequences)
        documents[0].append(np.arange(10_000, 10_040))  # enough tokens for a sample
        data = MemoryIndexedDataset(documents)
        ids = np.sort(rng.choice(len(documents), size=int(rng.integers(1, len(documents) + 1)), replace=False))
        if 0 not in ids:
            ids = np.concatenate([[0], ids])
        seq_len = int(rng.integers(1, 30))
        num_samples = int(rng.integers(1, 200))
        ds = GPTDataset(data, ids, seq_len, num_samples, seed=seed, cache_dir=False, return_document_ids=True)
        assert len(ds) >= num_samples
        stream = stream_of(documents, ds.document_index)
        # Every document of the split appears exactly num_epochs times in the document index.
        assert sorted(ds.document_index.tolist()) == sorted(np.repeat(ids, ds.num_epochs).tolist())
        assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
        for idx in range(len(ds)):
            k = int(ds.shuffle_index[idx])
            item = ds[idx]
            assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (seq_len + 1,)
            np.testing.assert_array_equal(item["tokens"], stream[k * seq_len: k * seq_len + seq_len + 1])


def test_epochs_are_the_fewest_that_cover_num_samples():
    data = MemoryIndexedDataset([[np.arange(0, 50)], [np.arange(50, 101)]])  # 101 tokens
    assert GPTDataset(data, None, 10, None, cache_dir=False).num_epochs == 1
    assert len(GPTDataset(data, None, 10, None, cache_dir=False)) == 10  # (101 - 1) // 10
    assert GPTDataset(data, None, 10, 10, cache_dir=False).num_epochs == 1
    ds = GPTDataset(data, None, 10, 11, cache_dir=False)  # 11 * 10 + 1 = 111 > 101 tokens
    assert ds.num_epochs == 2 and len(ds) == (202 - 1) // 10


def test_index_building_follows_megatrons_random_state_sequence():
    # Megatron: RandomState(seed); document index = mgrid epochs x docs, shuffled (per part when the final
    # epoch is separated); then the shuffle index from the same state.
    rng = np.random.default_rng(5)
    documents = random_documents(rng, 20, allow_empty=False)
    data = MemoryIndexedDataset(documents)
    ids = np.arange(3, 17)
    tokens = int(document_lengths(data)[ids].sum())
    per_epoch = (tokens - 1) // 8
    # 2 samples of the second epoch: shuffled on its own; 95 % of it: one shuffle; a single epoch.
    for num_samples, separate in [(per_epoch + 2, True), (int(1.95 * per_epoch), False), (per_epoch - 3, False)]:
        ds = GPTDataset(data, ids, 8, num_samples, seed=77, cache_dir=False)
        state = np.random.RandomState(77)

        def shuffled_epochs(n):
            index = np.mgrid[0:n, 0:len(ids)][1]
            index[:] = ids
            index = index.reshape(-1).astype(np.int32)
            state.shuffle(index)
            return index

        if separate:
            assert ds.num_epochs == 2
            document_index = np.concatenate([shuffled_epochs(1), shuffled_epochs(1)])
            first = per_epoch
        else:
            document_index = shuffled_epochs(ds.num_epochs)
            first = len(ds)
        np.testing.assert_array_equal(ds.document_index, document_index)
        shuffle = np.arange(first, dtype=np.uint32)
        state.shuffle(shuffle)
        if first < len(ds):
            rest = np.arange(first, len(ds), dtype=np.uint32)
            state.shuffle(rest)
            shuffle = np.concatenate([shuffle, rest])
        np.testing.assert_array_equal(ds.shuffle_index, shuffle)


def test_same_seed_same_samples_other_seed_other_order():
    rng = np.random.default_rng(0)
    data = MemoryIndexedDataset(random_documents(rng, 30, allow_empty=False))
    a = GPTDataset(data, None, 16, 50, seed=3, cache_dir=False)
    b = GPTDataset(data, None, 16, 50, seed=3, cache_dir=False)
    c = GPTDataset(data, None, 16, 50, seed=4, cache_dir=False)
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(len(a)))


def test_kept_partial_last_sample_is_padded():
    data = MemoryIndexedDataset([[np.arange(1, 24)]])  # 23 tokens: 2 full samples of 10 + 1, then 2 tokens
    ds = GPTDataset(data, None, 10, None, cache_dir=False, drop_last_partial_sequence=False, pad_id=-1)
    assert len(ds) == 3
    last = next(ds.sample(i)[0] for i in range(3) if int(ds.shuffle_index[i]) == 2)
    np.testing.assert_array_equal(last, [21, 22, 23] + [-1] * 8)
    with pytest.raises(ValueError, match="give pad_id"):
        GPTDataset(data, None, 10, None, cache_dir=False, drop_last_partial_sequence=False)


def test_labels_option_and_torch_dataloader_collate():
    rng = np.random.default_rng(1)
    data = MemoryIndexedDataset(random_documents(rng, 10, allow_empty=False))
    ds = GPTDataset(data, None, 8, 20, cache_dir=False, labels=True)
    item = ds[0]
    assert item["tokens"].shape == (8,) and item["labels"].shape == (8,)
    np.testing.assert_array_equal(item["tokens"][1:], item["labels"][:-1])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == torch.int64


def test_bad_arguments_raise_value_errors_naming_gpt_dataset():
    data = MemoryIndexedDataset([[np.arange(30)], [np.arange(30, 40)]])
    with pytest.raises(ValueError, match="GPTDataset: document_ids is empty"):
        GPTDataset(data, np.array([], dtype=np.int64), 4, cache_dir=False)
    with pytest.raises(ValueError, match=r"GPTDataset: document_ids must lie in \[0, 2\)"):
        GPTDataset(data, [0, 2], 4, cache_dir=False)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(data, [1], 10, cache_dir=False)  # 10 tokens < 11
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        GPTDataset(data, None, 0, cache_dir=False)
    with pytest.raises(IndexError, match="out of range"):
        GPTDataset(data, None, 4, cache_dir=False)[10_000]


# ---- the on-disk cache ----------------------------------------------------------------------------------


def test_cache_is_written_atomically_and_reused(tmp_path):
    rng = np.random.default_rng(2)
    data = MemoryIndexedDataset(random_documents(rng, 40, allow_empty=False))
    first = GPTDataset(data, None, 16, 100, seed=9, cache_dir=tmp_path)
    assert not first.cache_hit
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(f"{first.cache_key}-GPTDataset-{n}" for n in
                           ("document_index.npy", "sample_index.npy", "shuffle_index.npy", "description.json"))
    assert json.loads((tmp_path / files[0]).read_text())["seed"] == 9
    second = GPTDataset(data, None, 16, 100, seed=9, cache_dir=tmp_path)
    assert second.cache_hit
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert all(np.array_equal(first[i]["tokens"], second[i]["tokens"]) for i in range(len(first)))


def test_cache_key_changes_with_every_parameter_and_the_data(tmp_path):
    rng = np.random.default_rng(3)
    documents = random_documents(rng, 40, allow_empty=False)
    data = MemoryIndexedDataset(documents)
    base = dict(document_ids=np.arange(30), seq_len=16, num_samples=100, seed=9)
    key = GPTDataset(data, cache_dir=False, **base).cache_key
    for change in (dict(document_ids=np.arange(1, 31)), dict(seq_len=15), dict(num_samples=101), dict(seed=10)):
        assert GPTDataset(data, cache_dir=False, **{**base, **change}).cache_key != key, change
    documents[0][0] = np.append(documents[0][0], 99_999)  # same ids, one document longer
    assert GPTDataset(MemoryIndexedDataset(documents), cache_dir=False, **base).cache_key != key


def test_damaged_cache_is_rebuilt_not_trusted(tmp_path):
    rng = np.random.default_rng(4)
    data = MemoryIndexedDataset(random_documents(rng, 40, allow_empty=False))
    good = GPTDataset(data, None, 16, 100, seed=1, cache_dir=tmp_path)
    path = tmp_path / f"{good.cache_key}-GPTDataset-sample_index.npy"
    path.write_bytes(path.read_bytes()[:50])  # truncated
    again = GPTDataset(data, None, 16, 100, seed=1, cache_dir=tmp_path)
    assert not again.cache_hit
    np.testing.assert_array_equal(again.sample_index, good.sample_index)
    np.save(path, np.zeros((3, 2), dtype=np.int64))  # wrong shape
    assert not GPTDataset(data, None, 16, 100, seed=1, cache_dir=tmp_path).cache_hit
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_default_cache_lives_next_to_the_dataset_prefix(tmp_path):
    rng = np.random.default_rng(6)
    data = MemoryIndexedDataset(random_documents(rng, 10, allow_empty=False), path_prefix=str(tmp_path / "corpus"))
    ds = GPTDataset(data, None, 8, 10)
    assert ds.cache_dir == tmp_path / "corpus.index-cache"
    assert len(os.listdir(ds.cache_dir)) == 4


def test_pickled_copy_reopens_the_cache_and_gives_the_same_samples(tmp_path):
    rng = np.random.default_rng(7)
    data = MemoryIndexedDataset(random_documents(rng, 30, allow_empty=False))
    GPTDataset(data, None, 8, 40, seed=2, cache_dir=tmp_path)
    for cache_dir in (tmp_path, False):
        ds = GPTDataset(data, None, 8, 40, seed=2, cache_dir=cache_dir)
        copy = pickle.loads(pickle.dumps(ds))
        assert isinstance(copy.sample_index, np.memmap) == (cache_dir is not False)  # reopened, not copied
        assert all(np.array_equal(ds[i]["tokens"], copy[i]["tokens"]) for i in range(len(ds)))


def test_over_a_real_indexed_dataset_with_sentence_split_documents(tmp_path):
    indexed = pytest.importorskip("megacore.data.indexed")
    rng = np.random.default_rng(11)
    documents = random_documents(rng, 25, max_sequences=3, allow_empty=False)
    prefix = str(tmp_path / "corpus")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for doc in documents:
        builder.add_document(np.concatenate(doc), lengths=[len(s) for s in doc])
    builder.finalize(prefix + ".idx")
    data = indexed.IndexedDataset(prefix)
    ds = GPTDataset(data, np.arange(3, 25), 16, 100, seed=4)
    assert ds.cache_dir == tmp_path / "corpus.index-cache" and not ds.cache_hit
    stream = stream_of(documents, ds.document_index)
    for idx in range(len(ds)):
        k = int(ds.shuffle_index[idx])
        np.testing.assert_array_equal(ds[idx]["tokens"], stream[k * 16: k * 16 + 17])
    assert GPTDataset(indexed.IndexedDataset(prefix), np.arange(3, 25), 16, 100, seed=4).cache_hit


# ---- splits ---------------------------------------------------------------------------------------------


def test_split_string_949_50_1_on_1000_documents():
    assert split_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])


def test_split_rounding_shifts_boundaries_so_the_last_is_n():
    assert split_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]  # 3+3+3 = 9, all shifted by 1
    assert split_ranges("98,2", 10) == [(0, 10), (10, 10), (10, 10)]
    assert split_ranges("98/2/0", 100) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    for n in range(0, 60):
        for split in ("949,50,1", "1,1,1", "0.1,49.9,50", "5,0,5", "0,0,1"):
            ranges = split_ranges(split, n)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(b <= e for b, e in ranges) and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    ids = split_documents("8,1,1", 10)
    assert [a.tolist() for a in ids] == [list(range(8)), [8], [9]]


@pytest.mark.parametrize("bad", ["a,b", "1,2,3,4", "-1,2", "0,0,0", ""])
def test_bad_split_strings_are_value_errors(bad):
    with pytest.raises(ValueError, match="megacore.data.parse_split"):
        split_ranges(bad, 10)


def test_build_gpt_datasets_gives_disjoint_splits_and_none_for_empty_ones():
    rng = np.random.default_rng(8)
    data = MemoryIndexedDataset(random_documents(rng, 50, allow_empty=False))
    train, valid, test = build_gpt_datasets(data, "90,10,0", seq_len=8, num_samples=(100, 10, None), cache_dir=False)
    assert test is None
    assert set(train.document_ids.tolist()).isdisjoint(valid.document_ids.tolist())
    assert len(train.document_ids) + len(valid.document_ids) == 50
    assert len(train) >= 100 and len(valid) >= 10
