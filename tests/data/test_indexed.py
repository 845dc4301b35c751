"""megacore.data.indexed: Megatron's MMap indexed dataset (.bin + .idx), read and written byte for byte.

Compatibility is checked against an independent reader and writer written here from the format's spec
(struct + np.frombuffer), not against megacore's own code.
"""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacore.data import DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, best_dtype
from megacore.data.indexed import write_dataset

# -- an independent implementation of the format, from the spec ----------------------------------------------
SPEC_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def spec_write(prefix, documents, code):
    """documents: list of documents, each a list of sequences (lists of ints). Writes prefix.bin / .idx."""
    dt = np.dtype(SPEC_CODES[code])
    lengths, pointers, doc_idx, data = [], [], [0], b""
    for doc in documents:
        for seq in doc:
            pointers.append(len(data))
            lengths.append(len(seq))
            data += np.asarray(seq, dtype=dt).tobytes()
        doc_idx.append(len(lengths))
    with open(f"{prefix}.bin", "wb") as f:
        f.write(data)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def spec_read(prefix):
    """-> (code, lengths, pointers, doc_idx, sequences) read with struct from the spec."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", raw, 17)
    n, ndoc = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = list(struct.unpack_from(f"<{n}i", raw, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", raw, off))
    off += 8 * n
    doc_idx = list(struct.unpack_from(f"<{ndoc}q", raw, off))
    off += 8 * ndoc
    assert off == len(raw), "trailing bytes in .idx"
    data = open(f"{prefix}.bin", "rb").read()
    dt = np.dtype(SPEC_CODES[code])
    seqs = [np.frombuffer(data, dtype=dt, count=ln, offset=p).tolist() for ln, p in zip(lengths, pointers)]
    return code, lengths, pointers, doc_idx, seqs


def random_documents(rng, n_docs, vocab, max_seqs=3, max_len=20):
    return [[rng.integers(0, vocab, rng.integers(0, max_len + 1)).tolist() for _ in range(rng.integers(1, max_seqs + 1))]
            for _ in range(n_docs)]


def build(prefix, documents, dtype):
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as b:
        for doc in documents:
            if len(doc) == 1:
                b.add_document(doc[0])
            else:
                b.add_document(np.concatenate([np.asarray(s, dtype=np.int64) for s in doc]), lengths=[len(s) for s in doc])
        b.finalize(f"{prefix}.idx")


CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


# -- the spec ----------------------------------------------------------------------------------------------------
def test_dtype_codes_are_megatrons():
    assert {c: np.dtype(t).name for c, t in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


@pytest.mark.parametrize("vocab,expected", [(1, np.uint16), (50257, np.uint16), (65499, np.uint16),
                                            (65500, np.int32), (250000, np.int32)])
def test_best_dtype_is_uint16_under_65500_tokens(vocab, expected):
    assert best_dtype(vocab) == np.dtype(expected)


def test_best_dtype_rejects_a_nonpositive_vocab():
    with pytest.raises(ValueError, match="best_dtype: vocab_size"):
        best_dtype(0)


def test_builder_writes_these_exact_bytes(tmp_path):
    """Two documents, the second with two sequences, uint16: the whole .idx spelled out by hand."""
    p = tmp_path / "d"
    with IndexedDatasetBuilder(f"{p}.bin", np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_item([258])
        b.add_item([])
        b.end_document()
        b.finalize(f"{p}.idx")
    expected_idx = (b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([8]) + (3).to_bytes(8, "little")
                    + (3).to_bytes(8, "little")
                    + b"".join(x.to_bytes(4, "little") for x in (3, 1, 0))
                    + b"".join(x.to_bytes(8, "little") for x in (0, 6, 8))
                    + b"".join(x.to_bytes(8, "little") for x in (0, 1, 3)))
    assert (tmp_path / "d.idx").read_bytes() == expected_idx
    assert (tmp_path / "d.bin").read_bytes() == bytes([1, 0, 2, 0, 3, 0, 2, 1])


# -- round trip and compatibility both ways ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16])
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 30, 100)
    build(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    flat = [s for d in docs for s in d]
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(flat) and ds.num_documents == len(docs)
    for i, s in enumerate(flat):
        assert ds[i].dtype == np.dtype(dtype) and ds[i].tolist() == s
    for j, d in enumerate(docs):
        assert [s.tolist() for s in ds.document(j)] == d
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64 and ds.document_indices[-1] == len(ds)


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_files_written_by_the_spec_writer_read_back(tmp_path, code):
    rng = np.random.default_rng(code)
    docs = random_documents(rng, 25, 120)
    spec_write(tmp_path / "s", docs, code)
    ds = IndexedDataset(tmp_path / "s")
    assert CODE_OF[ds.dtype] == code
    assert [x.tolist() for x in ds] == [s for d in docs for s in d]
    assert ds.document_indices.tolist() == [0] + np.cumsum([len(d) for d in docs]).tolist()


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_builder_output_is_byte_identical_to_the_spec_writer(tmp_path, code):
    rng = np.random.default_rng(100 + code)
    docs = random_documents(rng, 25, 120)
    spec_write(tmp_path / "s", docs, code)
    build(tmp_path / "m", docs, DTYPE_CODES[code])
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "s.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "s.bin").read_bytes()
    got_code, lengths, _, doc_idx, seqs = spec_read(tmp_path / "m")
    assert got_code == code and seqs == [s for d in docs for s in d]
    assert doc_idx == [0] + np.cumsum([len(d) for d in docs]).tolist()


def test_an_empty_dataset_round_trips(tmp_path):
    build(tmp_path / "e", [], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and list(ds) == []
    assert spec_read(tmp_path / "e")[3] == [0]


def test_get_reads_a_window_and_rejects_one_outside_the_sequence(tmp_path):
    ds = write_dataset(tmp_path / "d", [np.arange(10), np.arange(5)], np.int32)
    assert ds.get(0, offset=3, length=4).tolist() == [3, 4, 5, 6]
    assert ds.get(1, offset=2).tolist() == [2, 3, 4]
    assert ds[-1].tolist() == list(range(5))
    assert [a.tolist() for a in ds[0:2]] == [list(range(10)), list(range(5))]
    with pytest.raises(IndexError, match="outside sequence 0 of 10 tokens"):
        ds.get(0, offset=8, length=3)
    with pytest.raises(IndexError, match="out of range for 2 sequences"):
        ds[2]
    with pytest.raises(IndexError, match="document 5 out of range"):
        ds.document(5)


def test_sequences_are_read_only_views(tmp_path):
    ds = write_dataset(tmp_path / "d", [np.arange(10)], np.int32)
    a = ds[0]
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1


def test_a_dataset_pickles_by_prefix_and_reopens(tmp_path):
    ds = write_dataset(tmp_path / "d", [np.arange(7), [np.arange(2), np.arange(3)]], np.uint16)
    blob = pickle.dumps(ds)
    assert len(blob) < 500  # the maps are not pickled
    again = pickle.loads(blob)
    assert [a.tolist() for a in again] == [a.tolist() for a in ds]
    assert again.document_indices.tolist() == [0, 1, 3]


# -- the builder ------------------------------------------------------------------------------------------------
def test_builder_rejects_tokens_that_do_not_fit_the_dtype(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d.bin", np.uint16) as b:
        with pytest.raises(ValueError, match="add_document: token 65536 does not fit uint16"):
            b.add_document([1, 65536])
        with pytest.raises(ValueError, match="add_item: token -1 does not fit uint16"):
            b.add_item([-1])
        with pytest.raises(ValueError, match="tokens must be 1-D"):
            b.add_item([[1, 2]])
        with pytest.raises(ValueError, match="must be non-negative and sum to the 3 tokens"):
            b.add_document([1, 2, 3], lengths=[1, 1])


def test_builder_rejects_a_dtype_the_format_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="not storable"):
        IndexedDatasetBuilder(tmp_path / "d.bin", np.uint32)


def test_builder_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    with IndexedDatasetBuilder(tmp_path / "d.bin", np.int32) as b:
        b.add_document(torch.arange(4))
        b.finalize(tmp_path / "d.idx")
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [0, 1, 2, 3]


def test_an_exception_inside_the_builder_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "d.bin", np.int32) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_an_old_dataset_and_leaves_no_temporary_files(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(100)], np.int32)
    write_dataset(tmp_path / "d", [np.arange(3)], np.int32)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [0, 1, 2]


def test_an_interrupted_rewrite_leaves_the_old_dataset_whole(tmp_path, monkeypatch):
    """The new .idx is written before anything old is touched: a crash while writing it leaves the old
    dataset readable and no temporaries."""
    import megacore.data.indexed as indexed

    write_dataset(tmp_path / "d", [np.arange(100)], np.int32)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexed, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "d", [np.arange(3)], np.int32)
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    np.testing.assert_array_equal(np.asarray(IndexedDataset(tmp_path / "d")[0]), np.arange(100))


def test_an_interrupted_swap_never_pairs_an_old_idx_with_a_new_bin(tmp_path, monkeypatch):
    """Between the .bin's rename and the .idx's, the old .idx is already gone."""
    import megacore.data.indexed as indexed

    write_dataset(tmp_path / "d", [np.arange(100)], np.int32)
    real = os.replace

    def crash_on_idx(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "d", [np.arange(3)], np.int32)
    assert sorted(os.listdir(tmp_path)) == ["d.bin"]


def test_the_builder_cannot_be_used_after_finalize(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "d.bin", np.int32)
    b.finalize(tmp_path / "d.idx")
    with pytest.raises(RuntimeError, match="already finalized"):
        b.add_item([1])


# -- merge ------------------------------------------------------------------------------------------------------
def test_merge_appends_whole_datasets_in_order(tmp_path):
    rng = np.random.default_rng(3)
    parts = [random_documents(rng, n, 500) for n in (5, 0, 7)]
    for k, docs in enumerate(parts):
        build(tmp_path / f"p{k}", docs, np.uint16)
    with IndexedDatasetBuilder(tmp_path / "m.bin", np.uint16) as b:
        b.add_document([9, 9])
        for k in range(3):
            b.merge(tmp_path / f"p{k}")
        b.finalize(tmp_path / "m.idx")
    everything = [[[9, 9]]] + [d for docs in parts for d in docs]
    spec_write(tmp_path / "s", everything, 8)
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "s.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "s.bin").read_bytes()


def test_merge_copies_sequences_of_a_dataset_whose_pointers_have_gaps(tmp_path):
    # Written by hand: sequence 1 stored before sequence 0, with a gap; the format allows it.
    data = np.array([7, 7, 99, 5, 6, 8], dtype="<i4")
    (tmp_path / "g.bin").write_bytes(data.tobytes())
    with open(tmp_path / "g.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 2))
        f.write(struct.pack("<2i2q2q", 3, 2, 12, 0, 0, 2))
    assert [a.tolist() for a in IndexedDataset(tmp_path / "g")] == [[5, 6, 8], [7, 7]]
    with IndexedDatasetBuilder(tmp_path / "m.bin", np.int32) as b:
        b.merge(tmp_path / "g")
        b.finalize(tmp_path / "m.idx")
    assert spec_read(tmp_path / "m")[4] == [[5, 6, 8], [7, 7]]


def test_merge_rejects_another_dtype(tmp_path):
    write_dataset(tmp_path / "a", [np.arange(3)], np.int32)
    with IndexedDatasetBuilder(tmp_path / "m.bin", np.uint16) as b:
        with pytest.raises(ValueError, match="merge: .*a.idx holds int32, this builder uint16"):
            b.merge(tmp_path / "a")


# -- validation: corrupt and truncated files are clear errors ---------------------------------------------------
def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx does not exist"):
        IndexedDataset(tmp_path / "nope")
    write_dataset(tmp_path / "d", [np.arange(3)], np.int32)
    os.remove(tmp_path / "d.bin")
    with pytest.raises(FileNotFoundError, match="d.bin does not exist"):
        IndexedDataset(tmp_path / "d")


def _corrupt_header(path, offset, fmt, value):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("offset,fmt,value,message", [
    (0, "<9s", b"MMIDIDY\x00\x00", "not a Megatron MMap index"),
    (9, "<Q", 2, "version 2, expected 1"),
    (17, "<B", 9, "dtype code 9"),
    (18, "<Q", 5, "needs"),
    (26, "<Q", 0, "document index count of 0"),
    (26, "<Q", 1 << 62, "needs"),
    (34, "<i", -4, "negative length"),
    (34, "<i", 1000, "too short"),
    (34 + 4 * 3 + 8, "<q", 1 << 40, "outside"),
    (34 + 4 * 3 + 8 * 3, "<q", 1, "document indices must rise from 0"),
    (34 + 4 * 3 + 8 * 3 + 8, "<q", 5, "and they decrease"),
])
def test_a_corrupt_index_is_a_clear_error(tmp_path, offset, fmt, value, message):
    write_dataset(tmp_path / "d", [np.arange(5), [np.arange(2), np.arange(3)]], np.int32)
    _corrupt_header(tmp_path / "d.idx", offset, fmt, value)
    with pytest.raises(ValueError, match=message) as e:
        IndexedDataset(tmp_path / "d")
    assert "d.idx" in str(e.value) or "d.bin" in str(e.value)


def test_a_truncated_bin_is_a_clear_error(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(5), np.arange(9)], np.int32)
    with open(tmp_path / "d.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match=r"d.bin is too short \(40 bytes\): sequence 1 .*truncated"):
        IndexedDataset(tmp_path / "d")


def _check_opens_safely_or_fails_clearly(prefix):
    """The property every corrupted file must satisfy: a ValueError naming the file, or a dataset whose every
    sequence reads inside the .bin."""
    try:
        ds = IndexedDataset(prefix)
    except ValueError as e:
        assert "megacore.data.IndexedDataset" in str(e) and ("d.idx" in str(e) or "d.bin" in str(e)), str(e)
        return
    bin_size = os.path.getsize(f"{prefix}.bin")
    for i in range(len(ds)):
        a = ds[i]
        assert a.size == ds.sequence_lengths[i]
        assert ds.sequence_pointers[i] + a.nbytes <= bin_size
    for j in range(ds.num_documents):
        ds.document(j)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def clean_dataset(tmp_path):
    rng = np.random.default_rng(7)
    build(tmp_path / "d", random_documents(rng, 6, 1000, max_len=6), np.uint16)
    return tmp_path / "d", (tmp_path / "d.idx").read_bytes(), (tmp_path / "d.bin").read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_corrupted_index_bytes(clean_dataset, edits):
    prefix, idx, _ = clean_dataset
    raw = bytearray(idx)
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    (prefix.parent / "d.idx").write_bytes(bytes(raw))
    _check_opens_safely_or_fails_clearly(prefix)


@FUZZ
@given(idx_len=st.integers(0, 400), bin_len=st.integers(0, 200))
def test_fuzz_truncated_files(clean_dataset, idx_len, bin_len):
    prefix, idx, data = clean_dataset
    (prefix.parent / "d.idx").write_bytes(idx[:idx_len])
    (prefix.parent / "d.bin").write_bytes(data[:bin_len])
    _check_opens_safely_or_fails_clearly(prefix)


@FUZZ
@given(header=st.tuples(st.binary(min_size=9, max_size=9) | st.just(b"MMIDIDX\x00\x00"),
                        st.integers(0, 2**64 - 1) | st.just(1), st.integers(0, 255),
                        st.integers(0, 2**64 - 1) | st.integers(0, 8), st.integers(0, 2**64 - 1) | st.integers(0, 8)),
       body=st.binary(max_size=300))
def test_fuzz_random_headers_and_bodies(clean_dataset, header, body):
    prefix, _, _ = clean_dataset
    (prefix.parent / "d.idx").write_bytes(struct.pack("<9sQBQQ", *header) + body)
    _check_opens_safely_or_fails_clearly(prefix)
