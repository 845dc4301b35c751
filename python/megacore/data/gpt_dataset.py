"""GPTDataset: fixed-length language-model samples across document boundaries (Megatron's semantics).

The documents of a split are laid end to end, repeated for as many epochs as ``num_samples`` needs, and
cut into samples of ``seq_len + 1`` tokens; consecutive samples share one token (the last label of one
is the first input of the next); the last partial sample is dropped. Three indices make this random
access and shuffled:

- document index, int32 [num_epochs * num_docs]: the split's document ids, shuffled per epoch (the final
  epoch shuffled on its own when less than 80 % of it is used: Megatron's ``separate_final_epoch``);
- sample index, int64 [num_samples + 1, 2]: (position in the document index, token offset) where each
  sample starts, built in C++ (``megacore._C.build_sample_index``);
- shuffle index, uint32/int64 [num_samples]: a permutation of the samples.

All three come from one ``numpy.random.RandomState(seed)`` in Megatron's order, so a seed gives the same
samples here as in Megatron-LM over the same documents. They are cached as ``.npy`` files whose names
carry a hash of every parameter (and of the split's document lengths), written atomically.

Documents may hold several sequences (sentence-split datasets): a document's tokens are its sequences
concatenated.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from megacore import _C
from megacore._files import atomic_write, atomic_write_text

__all__ = ["GPTDataset", "build_gpt_datasets", "document_lengths"]

# Megatron separates the final epoch when fewer than this fraction of its samples are needed, so a
# nearly unused last epoch does not spread a few samples of every document across the whole run.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
_CACHE_FORMAT = 1


def document_lengths(dataset) -> np.ndarray:
    """Tokens per document, int64 [num_documents]: the sum of its sequences' lengths (0 for an empty one)."""
    seq_lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    doc_starts = np.asarray(dataset.document_indices, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(seq_lengths)])
    return cumulative[doc_starts[1:]] - cumulative[doc_starts[:-1]]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def _dataset_prefix(dataset) -> str | None:
    for name in ("path_prefix", "prefix"):
        prefix = getattr(dataset, name, None)
        if prefix is not None:
            return str(prefix)
    return None


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megacore" / "gpt_dataset"


def _default_cache_dir(dataset) -> Path:
    # Next to the dataset when we may write there, so the cache travels with the data; else per user.
    prefix = _dataset_prefix(dataset)
    if prefix is not None:
        directory = Path(prefix + ".index-cache")
        parent = directory.parent
        if os.access(directory, os.W_OK) if directory.is_dir() else os.access(parent, os.W_OK):
            return directory
    return _user_cache_dir()


def _build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                          separate_final_epoch: bool) -> np.ndarray:
    # Megatron's _build_document_index: same RandomState calls in the same order.
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(document_index)
        return document_index
    first = _build_document_index(documents, num_epochs - 1, rng, False)
    last = _build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    # Megatron's _build_shuffle_index: [0, num_samples) and [num_samples, total_size) shuffled separately.
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(0, num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset:
    """Samples of ``seq_len + 1`` tokens over the documents ``document_ids`` of ``dataset``.

    Args:
        dataset: an IndexedDataset-like object: ``sequence_lengths`` (int [num_sequences]),
            ``document_indices`` (int [num_documents + 1], first sequence of each document, last =
            num_sequences) and ``get(i, offset=0, length=None)`` (tokens of sequence i).
        document_ids: int [k], the documents of this split (e.g. from :func:`megacore.data.split_documents`);
            None for all documents.
        seq_len: tokens per sample fed to the model; each sample holds seq_len + 1 (inputs and labels).
        num_samples: samples wanted; the epochs are repeated until there are at least this many. None: one
            epoch. ``len(ds)`` is every sample of those epochs (>= num_samples), as in Megatron.
        seed: numpy RandomState seed of the document and shuffle indices.
        cache_dir: where the indices are cached; None: ``<prefix>.index-cache/`` next to the dataset when
            writable, else ``~/.cache/megacore/gpt_dataset``; False: no cache.
        drop_last_partial_sequence: drop the tokens that do not fill a last sample (default, Megatron's
            training behaviour); False keeps it, padded with ``pad_id``.
        pad_id: padding token of a kept partial sample (required when drop_last_partial_sequence=False).
        labels: False (default): ``{"tokens": int64 [seq_len + 1]}``; True: ``{"tokens": int64 [seq_len],
            "labels": int64 [seq_len]}`` shifted by one.
        return_document_ids: also return ``"document_ids"``, int64 [k], the documents the sample spans
            (varying length: not for the default DataLoader collate).

    Raises ValueError for empty splits, bad ids or lengths, and for a split too short for one sample.
    """

    def __init__(self, dataset, document_ids=None, seq_len: int = 1024, num_samples: int | None = None,
                 seed: int = 1234, *, cache_dir=None, drop_last_partial_sequence: bool = True,
                 pad_id: int | None = None, labels: bool = False, return_document_ids: bool = False):
        fn = "megacore.data.GPTDataset"
        if int(seq_len) < 1:
            raise ValueError(f"{fn}: seq_len must be >= 1, got {seq_len}")
        if num_samples is not None and int(num_samples) < 0:
            raise ValueError(f"{fn}: num_samples must be >= 0 or None, got {num_samples}")
        if not drop_last_partial_sequence and pad_id is None:
            raise ValueError(f"{fn}: drop_last_partial_sequence=False pads the last sample: give pad_id")
        self.dataset = dataset
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.drop_last_partial_sequence = bool(drop_last_partial_sequence)
        self.pad_id = pad_id
        self.labels = bool(labels)
        self.return_document_ids = bool(return_document_ids)
        self.add_extra_token = 1

        self._doc_starts = np.asarray(dataset.document_indices, dtype=np.int64)
        seq_lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        self._seq_cumulative = np.concatenate([[0], np.cumsum(seq_lengths)])
        self.document_lengths = self._seq_cumulative[self._doc_starts[1:]] - self._seq_cumulative[self._doc_starts[:-1]]
        num_documents = len(self.document_lengths)
        if document_ids is None:
            document_ids = np.arange(num_documents, dtype=np.int64)
        document_ids = np.asarray(document_ids)
        if document_ids.ndim != 1 or (document_ids.size and document_ids.dtype.kind not in "iu"):
            raise ValueError(f"{fn}: document_ids must be a 1-D integer array, got {document_ids.dtype} "
                             f"with shape {list(document_ids.shape)}")
        document_ids = document_ids.astype(np.int64)
        if document_ids.size == 0:
            raise ValueError(f"{fn}: document_ids is empty (an empty split?)")
        if document_ids.min() < 0 or document_ids.max() >= num_documents:
            raise ValueError(f"{fn}: document_ids must lie in [0, {num_documents}), got "
                             f"[{document_ids.min()}, {document_ids.max()}]")
        if num_documents >= 2**31:
            raise ValueError(f"{fn}: {num_documents} documents exceed the int32 document index")
        self.document_ids = document_ids
        self.tokens_per_epoch = int(self.document_lengths[document_ids].sum())
        needed = (0 if num_samples is None else int(num_samples) * self.seq_len) + self.add_extra_token
        if self.tokens_per_epoch < self.seq_len + self.add_extra_token:
            raise ValueError(f"{fn}: the split holds {self.tokens_per_epoch} tokens, fewer than one sample of "
                             f"seq_len + 1 = {self.seq_len + 1}")
        # Megatron's _get_num_epochs: the fewest epochs whose tokens cover num_samples samples.
        self.num_epochs = 1 if num_samples is None else max(1, -(-needed // self.tokens_per_epoch))
        self.num_samples_requested = num_samples

        self.description = self._description()
        self.cache_dir = None if cache_dir is False else Path(cache_dir) if cache_dir else _default_cache_dir(dataset)
        self.document_index, self.sample_index, self.shuffle_index = self._load_or_build()

    # ---- indices ----------------------------------------------------------------------------------------
    def _description(self) -> dict:
        lengths = np.ascontiguousarray(self.document_lengths[self.document_ids])
        return {
            "class": "GPTDataset",
            "format": _CACHE_FORMAT,
            "path_prefix": _dataset_prefix(self.dataset),
            "num_sequences": int(len(self._seq_cumulative) - 1),
            "num_documents": int(len(self.document_lengths)),
            # The ids and their lengths: a different split, or the same prefix rewritten, is another key.
            "document_ids_sha256": hashlib.sha256(np.ascontiguousarray(self.document_ids).tobytes()).hexdigest(),
            "document_lengths_sha256": hashlib.sha256(lengths.tobytes()).hexdigest(),
            "tokens_per_epoch": self.tokens_per_epoch,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples_requested,
            "num_epochs": self.num_epochs,
            "seed": self.seed,
            "add_extra_token_to_sequence": self.add_extra_token,
            "drop_last_partial_sequence": self.drop_last_partial_sequence,
            "separate_final_epoch_threshold": SEPARATE_FINAL_EPOCH_THRESHOLD,
        }

    @property
    def cache_key(self) -> str:
        """Hex SHA-256 (first 32 digits) of the JSON description of every parameter."""
        text = json.dumps(self.description, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _cache_paths(self) -> dict[str, Path]:
        base = f"{self.cache_key}-GPTDataset"
        return {name: self.cache_dir / f"{base}-{name}"
                for name in ("document_index.npy", "sample_index.npy", "shuffle_index.npy", "description.json")}

    def build_indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document_index int32 [num_epochs * k], sample_index int64 [n + 1, 2], shuffle_index [n]), uncached."""
        rng = np.random.RandomState(self.seed)
        L, extra = self.seq_len, self.add_extra_token
        separate_final_epoch = False
        if self.num_epochs > 1:
            samples_before_final = ((self.num_epochs - 1) * self.tokens_per_epoch - extra) // L
            samples_from_final = int(self.num_samples_requested) - samples_before_final
            samples_per_epoch = (self.tokens_per_epoch - extra) // L
            separate_final_epoch = samples_from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
        document_index = _build_document_index(self.document_ids, self.num_epochs, rng, separate_final_epoch)
        sample_index = _C.build_sample_index(
            self.document_lengths, document_index, L, self.num_epochs, self.tokens_per_epoch,
            self.drop_last_partial_sequence, extra)
        total = sample_index.shape[0] - 1
        first = samples_before_final if separate_final_epoch else total
        shuffle_index = _build_shuffle_index(first, total, rng)
        return document_index, sample_index, shuffle_index

    def _load_cached(self, paths) -> tuple | None:
        if not all(p.is_file() for p in paths.values()):
            return None
        try:
            if json.loads(paths["description.json"].read_text()) != json.loads(json.dumps(self.description)):
                return None
            document_index = np.load(paths["document_index.npy"], mmap_mode="r", allow_pickle=False)
            sample_index = np.load(paths["sample_index.npy"], mmap_mode="r", allow_pickle=False)
            shuffle_index = np.load(paths["shuffle_index.npy"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged cache is rebuilt, never trusted
        n = sample_index.shape[0] - 1 if sample_index.ndim == 2 else -1
        if (document_index.shape != (self.num_epochs * len(self.document_ids),) or n < 0
                or sample_index.shape != (n + 1, 2) or shuffle_index.shape != (n,)):
            return None
        return document_index, sample_index, shuffle_index

    def _load_or_build(self):
        if self.cache_dir is None:
            return self.build_indices()
        paths = self._cache_paths()
        cached = self._load_cached(paths)
        if cached is not None:
            self.cache_hit = True
            return cached
        self.cache_hit = False
        indices = self.build_indices()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name, array in zip(("document_index.npy", "sample_index.npy", "shuffle_index.npy"), indices):
                _atomic_save(paths[name], array)
            # Written last: its presence (with matching content) marks a complete cache entry.
            atomic_write_text(paths["description.json"], json.dumps(self.description, sort_keys=True, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a rebuild next time
        return indices

    cache_hit: bool = False

    def __getstate__(self):
        # DataLoader workers get a pickled copy: reopen the cached memory maps there instead of copying
        # the indices (hundreds of MB for long runs) through the pickle.
        state = self.__dict__.copy()
        if self.cache_dir is not None and isinstance(self.sample_index, np.memmap):
            for name in ("document_index", "sample_index", "shuffle_index"):
                state[name] = None
            state["_reopen_cache"] = True
        return state

    def __setstate__(self, state):
        reopen = state.pop("_reopen_cache", False)
        self.__dict__.update(state)
        if reopen:
            cached = self._load_cached(self._cache_paths())
            self.document_index, self.sample_index, self.shuffle_index = (
                cached if cached is not None else self.build_indices())

    # ---- samples ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sample_index.shape[0] - 1)

    def _document_tokens(self, document: int, offset: int, length: int | None) -> np.ndarray:
        # Tokens [offset, offset + length) of a document, across its sequences.
        s0, s1 = int(self._doc_starts[document]), int(self._doc_starts[document + 1])
        doc_len = int(self.document_lengths[document])
        end = doc_len if length is None else min(offset + length, doc_len)
        offset = max(offset, 0)
        if end <= offset:
            return np.empty(0, dtype=np.int64)
        if s1 - s0 == 1:
            return self.dataset.get(s0, offset=offset, length=end - offset)
        starts = self._seq_cumulative[s0:s1 + 1] - self._seq_cumulative[s0]  # [sequences + 1]
        parts = []
        s = int(np.searchsorted(starts, offset, side="right")) - 1
        position = offset
        while position < end:
            seq_end = int(starts[s + 1])
            take = min(end, seq_end) - position
            if take > 0:
                parts.append(self.dataset.get(s0 + s, offset=position - int(starts[s]), length=take))
            position += max(take, 0)
            s += 1
        return np.concatenate(parts)

    def sample(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 [seq_len + 1], document_ids int64 [k]) of sample idx (after the shuffle)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"megacore.data.GPTDataset: sample {idx} out of range for {n} samples")
        i = int(self.shuffle_index[idx % n])
        beg_pos, beg_off = (int(v) for v in self.sample_index[i])
        end_pos, end_off = (int(v) for v in self.sample_index[i + 1])
        extra = self.add_extra_token
        docs, parts = [], []
        for pos in range(beg_pos, end_pos + 1):
            doc = int(self.document_index[pos])
            offset = beg_off if pos == beg_pos else 0
            length = None if pos < end_pos else end_off + extra - offset
            docs.append(doc)
            parts.append(self._document_tokens(doc, offset, length))
        tokens = np.concatenate(parts).astype(np.int64, copy=False)
        want = self.seq_len + extra
        if len(tokens) < want:  # only the kept partial last sample
            tokens = np.concatenate([tokens, np.full(want - len(tokens), self.pad_id, dtype=np.int64)])
        return tokens, np.asarray(docs, dtype=np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens, documents = self.sample(int(idx))
        out = {"tokens": tokens[:-1], "labels": tokens[1:]} if self.labels else {"tokens": tokens}
        if self.return_document_ids:
            out["document_ids"] = documents
        return out

    def __repr__(self) -> str:
        return (f"GPTDataset({len(self)} samples of {self.seq_len}+1 tokens, {len(self.document_ids)} documents, "
                f"{self.num_epochs} epoch(s), seed {self.seed})")


def build_gpt_datasets(dataset, split="949,50,1", seq_len: int = 1024, num_samples=(None, None, None),
                       seed: int = 1234, **kwargs) -> list[GPTDataset | None]:
    """[train, valid, test] GPTDatasets over the document ranges of ``split`` (None for an empty split).

    num_samples: one entry per split (None: one epoch). Other keyword arguments go to GPTDataset.
    """
    from megacore.data.splits import split_documents

    if len(num_samples) != 3:
        raise ValueError(f"megacore.data.build_gpt_datasets: num_samples needs 3 entries, got {len(num_samples)}")
    out = []
    for ids, n in zip(split_documents(split, len(dataset.document_indices) - 1), num_samples):
        out.append(GPTDataset(dataset, ids, seq_len, n, seed, **kwargs) if len(ids) else None)
    return out
