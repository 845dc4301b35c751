"""Megatron-LM's memory-mapped indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``), read and written byte for
byte.

Layout of ``<prefix>.idx`` (little-endian, no padding)::

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8   <Q    version (1)
    17      1   <B    dtype code (DTYPE_CODES)
    18      8   <Q    sequence count n
    26      8   <Q    document count + 1 (the length of the document index array)
    34      4 n       int32 sequence lengths (tokens)
            8 n       int64 sequence pointers (byte offsets into .bin)
            8 (d+1)   int64 document indices (sequence index where each document starts; the last is n)

``<prefix>.bin`` is the token arrays of all sequences, concatenated in order, in the dtype of the header.

A document is one or more sequences (one per sentence when sentences were split), so
``document_indices = [0, ..., n]``.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np

from megacore._files import new_temp_file

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index count
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34

DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}

PathLike = Union[str, os.PathLike]


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for a vocabulary: uint16 under 65,500 tokens, else int32."""
    if vocab_size is None or int(vocab_size) <= 0:
        raise ValueError(f"megacore.data.best_dtype: vocab_size must be a positive int, got {vocab_size!r}")
    return np.dtype(np.uint16) if int(vocab_size) < 65500 else np.dtype(np.int32)


def data_file_path(prefix: PathLike) -> str:
    """``<prefix>.bin``"""
    return os.fspath(prefix) + ".bin"


def index_file_path(prefix: PathLike) -> str:
    """``<prefix>.idx``"""
    return os.fspath(prefix) + ".idx"


def dtype_code(dtype) -> int:
    """The header's code for a numpy dtype; ValueError for a dtype the format cannot store."""
    try:
        return _CODE_OF_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError) as e:
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ValueError(f"megacore.data.indexed: dtype {dtype!r} is not storable; expected one of {names}") from e


class IndexedDataset:
    """Memory-mapped, random-access reader of ``<prefix>.bin`` + ``<prefix>.idx``.

    ``len(ds)`` is the number of sequences; ``ds[i]`` is sequence ``i`` as a read-only 1-D array of ``ds.dtype``
    (a view into the memory map: copy it to keep it past ``close()``), ``ds[a:b]`` a list of them.

    Attributes: ``sequence_lengths`` (np.int32 [n]), ``sequence_pointers`` (np.int64 [n], byte offsets into
    .bin), ``document_indices`` (np.int64 [num_documents + 1]), ``dtype``, ``num_documents``.

    Opening validates everything an access could trip on, so later reads never go out of bounds:
    raises FileNotFoundError for a missing file and ValueError (naming the file and what is wrong) for a
    bad magic or version, an unknown dtype code, counts that disagree with the .idx size, negative lengths,
    pointers or lengths that reach past the end of the .bin, and document indices that are not a
    non-decreasing run from 0 to n.
    """

    def __init__(self, prefix: PathLike):
        self.prefix = os.fspath(prefix)
        self.idx_path = index_file_path(prefix)
        self.bin_path = data_file_path(prefix)
        self._open()

    # -- opening and validation ------------------------------------------------------------------------------
    def _open(self) -> None:
        where = "megacore.data.IndexedDataset"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: {path} does not exist (prefix {self.prefix!r})")
        idx_size = os.path.getsize(self.idx_path)
        bin_size = os.path.getsize(self.bin_path)

        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise ValueError(f"{where}: {self.idx_path} is truncated: {idx_size} bytes, shorter than the "
                             f"{HEADER_SIZE}-byte header")
        magic, version, code, n, n_doc_idx = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{where}: {self.idx_path} is not a Megatron MMap index: magic {magic!r}, "
                             f"expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"{where}: {self.idx_path} has version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{where}: {self.idx_path} has dtype code {code}, expected one of "
                             f"{sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._disk_dtype = self.dtype.newbyteorder("<")  # the format is little-endian on every machine
        if n_doc_idx < 1:
            raise ValueError(f"{where}: {self.idx_path} has a document index count of 0; expected at least 1 "
                             f"(documents + 1)")
        # Python ints: huge corrupt counts cannot overflow here.
        expected = HEADER_SIZE + 4 * n + 8 * n + 8 * n_doc_idx
        if expected != idx_size:
            raise ValueError(
                f"{where}: {self.idx_path} is {idx_size} bytes but its header ({n} sequences, "
                f"{n_doc_idx - 1} documents) needs {expected}" + (" (truncated)" if idx_size < expected else ""))

        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(idx, dtype="<i4", count=n, offset=offset)
        offset += 4 * n
        self.sequence_pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=offset)
        offset += 8 * n
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=n_doc_idx, offset=offset)
        self._idx_map = idx

        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if n:
            if lengths.min() < 0:
                i = int(np.argmin(lengths))
                raise ValueError(f"{where}: {self.idx_path}: sequence {i} has a negative length {lengths[i]}")
            if pointers.min() < 0 or pointers.max() > bin_size:
                bad = np.flatnonzero((pointers < 0) | (pointers > bin_size))[0]
                raise ValueError(f"{where}: {self.idx_path}: sequence {bad} starts at byte {pointers[bad]}, outside "
                                 f"{self.bin_path} ({bin_size} bytes)")
            # Compare in elements, not bytes, so a corrupt length cannot overflow int64.
            room = (bin_size - pointers) // self.dtype.itemsize
            if np.any(lengths > room):
                bad = int(np.flatnonzero(lengths > room)[0])
                raise ValueError(
                    f"{where}: {self.bin_path} is too short ({bin_size} bytes): sequence {bad} of {lengths[bad]} "
                    f"tokens at byte {pointers[bad]} would end at byte "
                    f"{int(pointers[bad]) + int(lengths[bad]) * self.dtype.itemsize} (truncated .bin?)")
        if docs[0] != 0 or docs[-1] != n or (len(docs) > 1 and np.any(np.diff(docs) < 0)):
            raise ValueError(f"{where}: {self.idx_path}: document indices must rise from 0 to the sequence count "
                             f"{n}; got first {docs[0]}, last {docs[-1]}"
                             + ("" if len(docs) < 2 or np.all(np.diff(docs) >= 0) else ", and they decrease"))

        # A zero-length file cannot be memory-mapped; an empty buffer reads the same.
        self._bin_map = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)

    def close(self) -> None:
        """Drops this reader's references to the memory maps. Arrays already returned stay valid: numpy unmaps
        a file only when its last view is gone (closing earlier would turn those views into crashes)."""
        self._bin_map = self._idx_map = None
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None

    def __getstate__(self):  # DataLoader workers reopen the maps rather than pickling them
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    # -- access --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def _index(self, i, what: str = "index") -> int:
        n = len(self)
        try:
            i = int(i)  # numpy ints too; rejects floats with a clear message below
        except (TypeError, ValueError):
            raise TypeError(f"megacore.data.IndexedDataset: {what} must be an int, got {type(i).__name__}") from None
        if i < -n or i >= n:
            raise IndexError(f"megacore.data.IndexedDataset: {what} {i} out of range for {n} sequences")
        return i + n if i < 0 else i

    def __getitem__(self, i):
        """Sequence ``i`` -> [length] array of ``dtype`` (a view); a slice -> list of arrays."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end when length is None) -> a view of
        [length] ``dtype``. IndexError when the window is not inside the sequence."""
        i = self._index(i)
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"megacore.data.IndexedDataset.get: tokens [{offset}, {offset + length}) are outside "
                             f"sequence {i} of {size} tokens")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin_map, dtype=self._disk_dtype, count=length, offset=start)

    def document(self, j: int) -> list[np.ndarray]:
        """The sequences of document ``j`` (one per sentence when sentences were split), as views."""
        d = self.num_documents
        if isinstance(j, (bool, float)) or not -d <= int(j) < d:
            raise IndexError(f"megacore.data.IndexedDataset.document: document {j} out of range for {d} documents")
        j = int(j) + (d if int(j) < 0 else 0)
        return [self.get(k) for k in range(int(self.document_indices[j]), int(self.document_indices[j + 1]))]

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
                f"{self.dtype.name})")


def write_index(idx_path: PathLike, dtype, sequence_lengths, document_indices) -> None:
    """Writes a ``.idx`` for sequences stored back to back in the .bin (pointers = running sum of lengths),
    atomically (temp file + ``os.replace``)."""
    dtype = np.dtype(dtype)
    code = dtype_code(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    docs = np.asarray(document_indices, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("megacore.data.write_index: sequence lengths must be in [0, 2**31)")
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    idx_path = os.fspath(idx_path)
    tmp = new_temp_file(idx_path)
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(docs)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(docs.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, idx_path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class IndexedDatasetBuilder:
    """Writes ``.bin`` + ``.idx`` in Megatron's format.

    Tokens go to a temporary file next to ``bin_path``; ``finalize(idx_path)`` removes any old ``.idx``,
    moves the ``.bin`` into place, then writes the ``.idx`` (temp file + ``os.replace``) last. An interrupted
    run therefore never leaves an ``.idx`` that describes the wrong ``.bin``. Use as a context manager (or
    call ``abort()``) so an exception removes the temporary file.

        with IndexedDatasetBuilder("out.bin", np.uint16) as b:
            b.add_document([5, 6, 7, 0])
            b.finalize("out.idx")
    """

    def __init__(self, bin_path: PathLike, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path = os.fspath(bin_path)
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.bin_path))):
            raise FileNotFoundError(f"megacore.data.IndexedDatasetBuilder: the directory of {self.bin_path} "
                                    f"does not exist")
        self._tmp_bin = new_temp_file(self.bin_path)
        self._file = open(self._tmp_bin, "wb")
        self._lengths = array("q")  # compact: billions of sequences must not become Python ints
        self._document_indices = array("q", [0])
        self._finalized = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._finalized:
            self.abort()
        return False

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def _check_open(self, what: str) -> None:
        if self._file is None:
            raise RuntimeError(f"megacore.data.IndexedDatasetBuilder.{what}: the builder is already "
                               f"{'finalized' if self._finalized else 'aborted'}")

    def _as_tokens(self, tokens, what: str) -> np.ndarray:
        if hasattr(tokens, "numpy") and callable(tokens.numpy):  # torch tensors, without importing torch
            tokens = tokens.detach().cpu().numpy()
        a = np.asarray(tokens)
        if a.ndim != 1:
            raise ValueError(f"megacore.data.IndexedDatasetBuilder.{what}: tokens must be 1-D, got shape {a.shape}")
        if a.size and np.issubdtype(self.dtype, np.integer):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise ValueError(f"megacore.data.IndexedDatasetBuilder.{what}: tokens have dtype {a.dtype}, "
                                 f"expected integers for a {self.dtype.name} dataset")
            info = np.iinfo(self.dtype)
            lo, hi = a.min(), a.max()
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise ValueError(f"megacore.data.IndexedDatasetBuilder.{what}: token {bad} does not fit "
                                 f"{self.dtype.name} [{info.min}, {info.max}]")
        return a.astype(self.dtype.newbyteorder("<"), copy=False)

    def add_item(self, tokens) -> None:
        """Appends one sequence (list, 1-D numpy array or tensor of token ids) to the current document."""
        self._check_open("add_item")
        a = self._as_tokens(tokens, "add_item")
        self._file.write(a.tobytes())
        self._lengths.append(len(a))

    def end_document(self) -> None:
        """Closes the current document (the sequences added since the last one)."""
        self._check_open("end_document")
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: Sequence[int] | None = None) -> None:
        """Appends one document: ``tokens`` as one sequence, or as consecutive sequences of ``lengths``
        (which must sum to ``len(tokens)``), then ends the document."""
        self._check_open("add_document")
        a = self._as_tokens(tokens, "add_document")
        if lengths is None:
            lengths = [len(a)]
        lengths = [int(x) for x in lengths]
        if any(x < 0 for x in lengths) or sum(lengths) != len(a):
            raise ValueError(f"megacore.data.IndexedDatasetBuilder.add_document: lengths {lengths[:8]}"
                             f"{'...' if len(lengths) > 8 else ''} must be non-negative and sum to the "
                             f"{len(a)} tokens")
        self._file.write(a.tobytes())
        self._lengths.extend(lengths)
        self._document_indices.append(len(self._lengths))

    def merge(self, prefix: PathLike) -> None:
        """Appends every document of the prepared dataset at ``prefix`` (same dtype). Call between documents."""
        self._check_open("merge")
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"megacore.data.IndexedDatasetBuilder.merge: {other.idx_path} holds {other.dtype.name}, "
                             f"this builder {self.dtype.name}")
        if self._document_indices[-1] != len(self._lengths):
            raise ValueError("megacore.data.IndexedDatasetBuilder.merge: the current document is not ended "
                             "(call end_document() first)")
        offset = len(self._lengths)
        lengths = other.sequence_lengths.astype(np.int64)
        contiguous = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=contiguous[1:])
        total = int(lengths.sum()) * self.dtype.itemsize
        if np.array_equal(contiguous, other.sequence_pointers) and os.path.getsize(other.bin_path) == total:
            # The usual case (any file this builder or Megatron wrote): copy the .bin wholesale.
            with open(other.bin_path, "rb") as src:
                shutil.copyfileobj(src, self._file, 16 << 20)
        else:  # pointers with gaps or in another order: copy sequence by sequence
            for i in range(len(other)):
                self._file.write(other.get(i).tobytes())
        self._lengths.extend(lengths.tolist())
        self._document_indices.extend((other.document_indices[1:] + offset).tolist())
        other.close()

    def finalize(self, idx_path: PathLike) -> None:
        """Writes the new ``.idx`` beside ``idx_path``, then moves the ``.bin`` and the ``.idx`` (last) into place:
        a failure before that leaves an existing dataset untouched. A document left open is ended."""
        self._check_open("finalize")
        if self._document_indices[-1] != len(self._lengths):
            self._document_indices.append(len(self._lengths))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        idx_path = os.fspath(idx_path)
        new_idx = new_temp_file(idx_path)
        try:
            # Everything new is complete before anything old goes; then an old .idx must not outlive its
            # .bin: it is removed before the new .bin lands, and the new .idx is renamed in last.
            write_index(new_idx, self.dtype, np.frombuffer(self._lengths, np.int64),
                        np.frombuffer(self._document_indices, np.int64))
            _remove(idx_path)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(new_idx, idx_path)
        except BaseException:
            _remove(self._tmp_bin)
            _remove(new_idx)
            raise
        self._finalized = True

    def abort(self) -> None:
        """Drops what was written (the temporary .bin); nothing at ``bin_path`` is touched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        _remove(self._tmp_bin)

    def __del__(self):
        try:
            if not self._finalized:
                self.abort()
        except Exception:
            pass


def write_dataset(prefix: PathLike, documents: Iterable, dtype) -> IndexedDataset:
    """Writes ``<prefix>.bin/.idx`` from an iterable of documents (each a 1-D token sequence, or a list of
    sequences for a multi-sequence document) and returns the opened dataset. A convenience for tests and
    small data."""
    with IndexedDatasetBuilder(data_file_path(prefix), dtype) as builder:
        for doc in documents:
            if isinstance(doc, (list, tuple)) and doc and not np.isscalar(doc[0]):
                for seq in doc:
                    builder.add_item(seq)
                builder.end_document()
            else:
                builder.add_document(doc)
        builder.finalize(index_file_path(prefix))
    return IndexedDataset(prefix)
