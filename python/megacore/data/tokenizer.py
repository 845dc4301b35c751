"""Tokenizers: one `Tokenizer` class over a Hugging Face `tokenizers.Tokenizer`, with megacore's special-token
conventions, trainers for byte-level BPE (GPT), WordPiece (BERT / ELECTRA) and sentencepiece-style Unigram with
sentinel tokens (T5), and loaders for the common formats.

Kinds (``Tokenizer.kind``):
  ``"bpe"``            byte-level BPE, GPT-2 style: every byte string encodes, ``decode(encode(x)) == x``.
  ``"wordpiece"``      BERT's WordPiece: BERT normalizer (lower-cases and strips accents when ``lowercase``),
                       splits on whitespace and punctuation, ``##`` continuation prefix, ``[UNK]`` for words it
                       cannot spell. Decoding joins word pieces; it does not restore case or spacing exactly.
  ``"sentencepiece"``  a sentencepiece model (Unigram or BPE, ``▁`` marks a word start).
  ``"unigram"``, ``"wordlevel"``, ``"bpe-other"``  other ``tokenizer.json`` models, loaded as they are.

Special tokens, by role (attributes ``eod``, ``pad``, ``cls``, ``sep``, ``mask``, ``unk``: an int id, or None
when the tokenizer has no such token):
  - byte-level BPE has GPT-2's single ``<|endoftext|>``: it is ``eod``, and also ``pad`` (GPT-2 has no padding
    token; padded positions must be excluded by the attention / loss masks, never by the id). ``cls``,
    ``sep``, ``mask`` and ``unk`` are None unless the training call names tokens for them.
  - WordPiece has ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4 when trained here); ``eod`` is ``[SEP]``, which
    ends every BERT segment.
  - Unigram trained here (:func:`train_unigram`, T5's layout): ``<pad>`` = 0, ``</s>`` = 1 (``eod``), ``<unk>`` = 2,
    and the sentinel tokens ``<extra_id_0>`` ... ``<extra_id_{n-1}>`` at the end of the vocabulary, ``<extra_id_0>``
    last (``Tokenizer.sentinels``; T5's span corruption replaces the i-th masked span by ``<extra_id_i>``).
  - Generally: a role with no token of its own falls back: ``eod`` to ``sep``, ``pad`` to ``eod``.
``encode`` never adds special tokens (the datasets add them where their format wants them), and ``decode``
skips none unless asked. Special tokens written literally in the text (``"<|endoftext|>"``) are recognised
as the special token, as Hugging Face's tokenizers do.

Persistence: ``save(directory)`` writes ``tokenizer.json`` (the Hugging Face file, loadable by
``tokenizers`` and ``transformers`` alone) and ``megacore_tokenizer.json`` (kind and special-token names),
each atomically; ``Tokenizer.load(directory or tokenizer.json)`` reads them back with the same ids.
`megacore prepare` saves the tokenizer next to the dataset it produced.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from megacore._files import atomic_write_text

try:
    import tokenizers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
except ImportError as e:  # pragma: no cover - tokenizers is a dependency
    raise ImportError("megacore.data.tokenizer needs the `tokenizers` package: pip install tokenizers") from e

KINDS = ("bpe", "wordpiece", "sentencepiece", "unigram", "wordlevel", "bpe-other")
ROLES = ("eod", "pad", "cls", "sep", "mask", "unk")

GPT2_EOD = "<|endoftext|>"
#: Default special tokens per kind, role -> token (None: no such token).
BPE_SPECIAL_TOKENS = {"eod": GPT2_EOD, "pad": None, "cls": None, "sep": None, "mask": None, "unk": None}
WORDPIECE_SPECIAL_TOKENS = {
    "eod": None, "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "unk": "[UNK]"
}  # fmt: skip
# Order of WordPiece's special tokens in a trained vocabulary (BERT's [PAD] is 0).
_WORDPIECE_ORDER = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: T5's special tokens (its sentencepiece model's ids 0-2).
UNIGRAM_SPECIAL_TOKENS = {"eod": "</s>", "pad": "<pad>", "cls": None, "sep": None, "mask": None, "unk": "<unk>"}
_UNIGRAM_ORDER = ("<pad>", "</s>", "<unk>")
#: The name of sentinel ``i`` (T5's and transformers' T5Tokenizer's).
SENTINEL_FORMAT = "<extra_id_{}>"
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")

# Candidate names per role when a file does not say which token plays which role (tokenizer.json,
# sentencepiece): the first one in the vocabulary wins.
_ROLE_CANDIDATES = {
    "eod": (GPT2_EOD, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}

_META_FILE = "megacore_tokenizer.json"
_JSON_FILE = "tokenizer.json"
_META_FORMAT = "megacore-tokenizer"
_META_VERSION = 1


class Tokenizer:
    """A tokenizer with megacore's special-token conventions (see the module docstring).

    Build one with :func:`train_bpe`, :func:`train_wordpiece`, a ``from_*`` loader or :meth:`Tokenizer.load`;
    the constructor wraps an existing ``tokenizers.Tokenizer``.

    Args:
        backend: the Hugging Face ``tokenizers.Tokenizer``.
        kind: one of :data:`KINDS`.
        special_tokens: role -> token string (or None), roles from :data:`ROLES`; every named token must be
            in the vocabulary. Missing roles are None, then ``eod`` falls back to ``sep`` and ``pad`` to
            ``eod``.

    Attributes: ``eod``, ``pad``, ``cls``, ``sep``, ``mask``, ``unk`` (int id or None), ``kind``,
    ``vocab_size``, ``special_tokens`` (role -> token string or None), ``backend``.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, kind: str, special_tokens: Mapping[str, str | None] | None = None
    ):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                f"megacore.data.Tokenizer: backend must be a tokenizers.Tokenizer, got {type(backend).__name__}"
            )
        if kind not in KINDS:
            raise ValueError(f"megacore.data.Tokenizer: kind must be one of {KINDS}, got {kind!r}")
        special_tokens = dict(special_tokens or {})
        unknown = sorted(set(special_tokens) - set(ROLES))
        if unknown:
            raise ValueError(f"megacore.data.Tokenizer: unknown special-token roles {unknown}; roles are {ROLES}")
        names = {role: special_tokens.get(role) for role in ROLES}
        if names["eod"] is None:
            names["eod"] = names["sep"]
        if names["pad"] is None:
            names["pad"] = names["eod"]
        for role, token in names.items():
            if token is None:
                setattr(self, role, None)
                continue
            if not isinstance(token, str):
                raise TypeError(f"megacore.data.Tokenizer: special token for {role!r} must be a str, got {token!r}")
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"megacore.data.Tokenizer: special token {token!r} ({role}) is not in the vocabulary "
                    f"(size {backend.get_vocab_size()}); pass special_tokens={{{role!r}: None}} if it has none"
                )
            setattr(self, role, token_id)
        # Special tokens must be marked special in the backend, so that decode(skip_special_tokens=True)
        # skips them and text never splits them into pieces; adding an existing token keeps its id.
        present = sorted({t for t in names.values() if t is not None})
        if present:
            backend.add_special_tokens(present)
        self.backend = backend
        self.kind = kind
        self.special_tokens = names

    # ---------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (a str), without special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"megacore.data.Tokenizer.encode: text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (in parallel, in the Rust library's thread pool), no special tokens added."""
        if isinstance(texts, str):
            raise TypeError("megacore.data.Tokenizer.encode_batch: texts must be a sequence of str, got one str")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(
                    f"megacore.data.Tokenizer.encode_batch: texts[{i}] must be a str, got {type(t).__name__}"
                )
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (ints or an integer array of shape [n]). Raises ValueError for an id outside
        ``[0, vocab_size)`` (the backend would silently drop it)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if ids.size == 0:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"megacore.data.Tokenizer.decode: ids must be a 1-D sequence of ints, got shape "
                f"{list(ids.shape)} dtype {ids.dtype}"
            )
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"megacore.data.Tokenizer.decode: ids[{i}] = {int(ids[i])} is outside [0, {self.vocab_size})"
            )
        return self.backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def word_starts(self) -> np.ndarray:
        """bool [vocab_size]: True where a token begins a word, False where it continues the previous token's
        word (for whole-word masking). WordPiece: tokens without the ``##`` prefix; byte-level BPE: tokens
        beginning with a space-like byte (``Ġ``, ``Ċ``, ...) or not with a letter or digit; sentencepiece:
        tokens beginning with ``▁`` or not with a letter or digit. Special tokens are word starts. The first
        token of a text always starts a word whatever this says."""
        vocab = self.backend.get_vocab(with_added_tokens=True)
        starts = np.ones(self.vocab_size, dtype=bool)
        specials = {t for t in self.special_tokens.values() if t is not None}
        for token, i in vocab.items():
            if token in specials or not token:
                continue
            if self.kind == "wordpiece":
                starts[i] = not token.startswith("##")
            elif self.kind == "bpe":
                # Byte-level BPE maps bytes 0-32 (whitespace and controls) to U+0100..U+0120, 'Ġ' being space.
                starts[i] = not token[0].isalnum() or 0x100 <= ord(token[0]) <= 0x120
            else:
                starts[i] = not token[0].isalnum() or token[0] == "\u2581"
        return starts

    @property
    def sentinels(self) -> list[int]:
        """The ids of the sentinel tokens ``<extra_id_0>``, ``<extra_id_1>``, ... in that order (T5's span
        corruption), ``[]`` when the vocabulary has none. Raises ValueError when the numbering has a gap."""
        cached = getattr(self, "_sentinels", None)
        if cached is None:
            found = {}
            for token, i in self.backend.get_vocab(with_added_tokens=True).items():
                m = _SENTINEL_RE.fullmatch(token)
                if m:
                    found[int(m.group(1))] = i
            if found and sorted(found) != list(range(len(found))):
                missing = min(set(range(max(found) + 1)) - set(found))
                raise ValueError(f"megacore.data.Tokenizer.sentinels: the vocabulary has {len(found)} sentinel tokens "
                                 f"but not {SENTINEL_FORMAT.format(missing)}")
            cached = self._sentinels = [found[k] for k in range(len(found))]
        return list(cached)

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={getattr(self, r)}" for r in ROLES if getattr(self, r) is not None)
        sentinels = f", sentinels={len(self.sentinels)}" if self.sentinels else ""
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, {roles}{sentinels})"

    # ---------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``megacore_tokenizer.json`` into ``directory`` (created if needed),
        each atomically (temporary file + rename). Returns the directory."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"megacore.data.Tokenizer.save: {directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _META_FORMAT,
            "version": _META_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
        }
        atomic_write_text(directory / _JSON_FILE, self.backend.to_str(pretty=True))
        atomic_write_text(directory / _META_FILE, json.dumps(meta, indent=2) + "\n")
        return directory

    def save_vocab(self, directory: str | os.PathLike) -> list[Path]:
        """Write the model's vocabulary in its classic format: GPT-2's ``vocab.json`` + ``merges.txt`` for
        BPE, BERT's ``vocab.txt`` for WordPiece. Returns the paths written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".vocab-") as tmp:
            written = [Path(p) for p in self.backend.model.save(tmp)]
            out = []
            for p in written:
                os.replace(p, directory / p.name)
                out.append(directory / p.name)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved by :meth:`save`: ``path`` is its directory or its ``tokenizer.json``. A
        ``tokenizer.json`` without megacore's metadata file next to it is loaded as by
        :func:`from_tokenizer_json` (kind and special tokens inferred)."""
        path = Path(path)
        if path.is_dir():
            json_path = path / _JSON_FILE
            if not json_path.is_file():
                raise FileNotFoundError(f"megacore.data.Tokenizer.load: {path} has no {_JSON_FILE}")
        elif path.is_file():
            json_path = path
        else:
            raise FileNotFoundError(f"megacore.data.Tokenizer.load: {path} does not exist")
        meta_path = json_path.parent / _META_FILE
        if not meta_path.is_file():
            return from_tokenizer_json(json_path)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"megacore.data.Tokenizer.load: {meta_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            raise ValueError(f"megacore.data.Tokenizer.load: {meta_path} is not a megacore tokenizer file")
        if meta.get("version") != _META_VERSION:
            raise ValueError(
                f"megacore.data.Tokenizer.load: {meta_path} has version {meta.get('version')!r}; this megacore "
                f"reads version {_META_VERSION}"
            )
        tok = cls(_backend_from_file(json_path, "Tokenizer.load"), meta.get("kind"), meta.get("special_tokens"))
        if meta.get("vocab_size") not in (None, tok.vocab_size):
            raise ValueError(
                f"megacore.data.Tokenizer.load: {json_path} has {tok.vocab_size} tokens but {meta_path} records "
                f"{meta['vocab_size']} (the two files do not belong together)"
            )
        return tok


# -------------------------------------------------------------------- helpers


def _backend_from_file(path: Path, fn: str) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"megacore.data.{fn}: {path} does not exist")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception for any malformed file
        raise ValueError(f"megacore.data.{fn}: {path} is not a valid tokenizer.json: {e}") from e


def _check_vocab_size(vocab_size, fn: str, minimum: int, why: str) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"megacore.data.{fn}: vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < minimum:
        raise ValueError(f"megacore.data.{fn}: vocab_size={vocab_size} is too small: {why} need {minimum}")
    return int(vocab_size)


def _resolve_special_tokens(defaults: Mapping[str, str | None], given: Mapping[str, str | None] | None, fn: str):
    names = dict(defaults)
    for role, token in (given or {}).items():
        if role not in ROLES:
            raise ValueError(f"megacore.data.{fn}: unknown special-token role {role!r}; roles are {ROLES}")
        names[role] = token
    return names


def _text_iterator(source, fn: str) -> Iterator[list[str]]:
    """Batches of lines (newlines kept, so merges across line ends are learned) from texts (str) or files
    (os.PathLike, xz-aware); None means the embedded training corpus."""
    from megacore.data.corpus import corpus_files, read_text

    if source is None:
        source = corpus_files("train")
    elif isinstance(source, (str, os.PathLike)):
        source = [source]
    batch: list[str] = []
    n = 0
    for item in source:
        if isinstance(item, os.PathLike):
            text = read_text(item)
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(
                f"megacore.data.{fn}: the training source must hold texts (str) or files (pathlib.Path), got "
                f"{type(item).__name__}"
            )
        n += 1
        batch.extend(text.splitlines(keepends=True))
        if len(batch) >= 10_000:
            yield batch
            batch = []
    if batch:
        yield batch
    if n == 0:
        raise ValueError(f"megacore.data.{fn}: the training source is empty")


def _train(backend: tokenizers.Tokenizer, trainer, source, fn: str) -> None:
    batches = list(_text_iterator(source, fn))  # materialised: errors surface here, not inside Rust
    if not any(line.strip() for batch in batches for line in batch):
        raise ValueError(f"megacore.data.{fn}: the training texts contain no text")
    backend.train_from_iterator(batches, trainer=trainer)


def _byte_level_backend(model) -> tokenizers.Tokenizer:
    # GPT-2's pipeline: no normalization, byte-level pre-tokenization (its regex split), byte-level decoding.
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _bert_backend(model, lowercase: bool) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(model)
    # strip_accents=None follows lowercase, as in BERT's uncased models.
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _bert_post_processor(backend: tokenizers.Tokenizer, names: Mapping[str, str | None]) -> None:
    # So the saved tokenizer.json behaves as BERT's in Hugging Face; megacore's encode never applies it.
    cls_token, sep_token = names.get("cls"), names.get("sep")
    cls_id = backend.token_to_id(cls_token) if cls_token else None
    sep_id = backend.token_to_id(sep_token) if sep_token else None
    if cls_id is not None and sep_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}",
            pair=f"{cls_token} $A {sep_token} $B:1 {sep_token}:1",
            special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
        )


# -------------------------------------------------------------------- trainers


def train_bpe(
    source=None,
    vocab_size: int = 32_000,
    *,
    min_frequency: int = 2,
    special_tokens: Mapping[str, str | None] | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) with the `tokenizers` library.

    Args:
        source: texts (``str``) and/or files (``pathlib.Path``; ``.xz`` is decompressed), an iterable of them
            or a single one; a plain ``str`` is always text, never a file name. None: the embedded corpus's
            training split.
        vocab_size: the largest vocabulary (special tokens included); at least 256 (the byte alphabet) plus
            the special tokens. A small corpus may give fewer tokens.
        min_frequency: a merge must occur this often.
        special_tokens: role -> token overriding :data:`BPE_SPECIAL_TOKENS` (e.g. ``{"mask": "<mask>"}``
            for a RoBERTa-style tokenizer); special tokens get the first ids, in role order.

    Returns a :class:`Tokenizer` of kind ``"bpe"``; ``eod`` = ``pad`` = ``<|endoftext|>`` by default.
    Raises ValueError for a too-small vocab_size or an empty source; FileNotFoundError for a missing file.
    """
    fn = "train_bpe"
    names = _resolve_special_tokens(BPE_SPECIAL_TOKENS, special_tokens, fn)
    specials = list(dict.fromkeys(t for t in names.values() if t is not None))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_size = _check_vocab_size(
        vocab_size,
        fn,
        len(alphabet) + len(specials),
        f"the byte alphabet ({len(alphabet)}) and {len(specials)} special token(s)",
    )
    backend = _byte_level_backend(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    _train(backend, trainer, source, fn)
    return Tokenizer(backend, "bpe", names)


def train_wordpiece(
    source=None,
    vocab_size: int = 30_522,
    *,
    lowercase: bool = True,
    min_frequency: int = 2,
    special_tokens: Mapping[str, str | None] | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a WordPiece tokenizer (BERT's / ELECTRA's scheme) with the `tokenizers` library.

    Args:
        source: as for :func:`train_bpe`.
        vocab_size: the largest vocabulary, special tokens included; it must hold the special tokens and every
            character of the corpus (the trainer keeps the whole alphabet), else ValueError.
        lowercase: BERT "uncased": lower-case and strip accents before splitting.
        min_frequency: a piece must occur this often.
        special_tokens: role -> token overriding :data:`WORDPIECE_SPECIAL_TOKENS`.

    Returns a :class:`Tokenizer` of kind ``"wordpiece"`` with ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4`` by
    default; ``eod`` is ``[SEP]``. Words it cannot spell become ``[UNK]``.
    """
    fn = "train_wordpiece"
    names = _resolve_special_tokens(WORDPIECE_SPECIAL_TOKENS, special_tokens, fn)
    if names["unk"] is None:
        raise ValueError(f"megacore.data.{fn}: WordPiece needs an unknown token (special_tokens['unk'] is None)")
    order = {t: i for i, t in enumerate(_WORDPIECE_ORDER)}
    specials = sorted(dict.fromkeys(t for t in names.values() if t is not None), key=lambda t: order.get(t, len(order)))
    vocab_size = _check_vocab_size(vocab_size, fn, len(specials) + 1, f"{len(specials)} special tokens and an alphabet")
    backend = _bert_backend(models.WordPiece(unk_token=names["unk"], max_input_chars_per_word=100), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    _train(backend, trainer, source, fn)
    got = backend.get_vocab_size(with_added_tokens=True)
    if got > vocab_size:
        raise ValueError(
            f"megacore.data.{fn}: vocab_size={vocab_size} is too small: the corpus's alphabet and the special "
            f"tokens alone need {got} (raise vocab_size)"
        )
    _bert_post_processor(backend, names)
    return Tokenizer(backend, "wordpiece", names)


def train_unigram(
    source=None,
    vocab_size: int = 32_000,
    *,
    sentinels: int = 100,
    special_tokens: Mapping[str, str | None] | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a sentencepiece-style Unigram tokenizer with sentinel tokens (T5's scheme) with the `tokenizers`
    library: NFKC normalization with runs of spaces collapsed, ``▁`` marking word starts (a space is prepended to
    the text, as sentencepiece's dummy prefix), so ``decode(encode(x))`` gives back ``x`` up to that normalization
    (newlines are kept) for text of characters it was trained on (printable ASCII always; others become ``<unk>``).

    Args:
        source: as for :func:`train_bpe` (for a bilingual tokenizer, pass the texts of both languages).
        vocab_size: the whole vocabulary: special tokens, learned pieces and sentinels (a small corpus may give
            fewer pieces; the sentinels are always there).
        sentinels: how many sentinel tokens ``<extra_id_0>`` ... to append (T5 has 100); 0 for none.
        special_tokens: role -> token overriding :data:`UNIGRAM_SPECIAL_TOKENS`.

    Returns a :class:`Tokenizer` of kind ``"sentencepiece"``: ``<pad>`` = 0, ``</s>`` = 1 (``eod``), ``<unk>`` = 2
    (T5's ids), the pieces, then the sentinels with ``<extra_id_0>`` last, as in T5's vocabulary and transformers'
    T5Tokenizer (``Tokenizer.sentinels`` lists them). Raises ValueError for a too-small vocab_size or an empty
    source.
    """
    fn = "train_unigram"
    if isinstance(sentinels, bool) or not isinstance(sentinels, int) or sentinels < 0:
        raise ValueError(f"megacore.data.{fn}: sentinels={sentinels!r} must be an int >= 0")
    names = _resolve_special_tokens(UNIGRAM_SPECIAL_TOKENS, special_tokens, fn)
    if names["unk"] is None:
        raise ValueError(f"megacore.data.{fn}: Unigram needs an unknown token (special_tokens['unk'] is None)")
    order = {t: i for i, t in enumerate(_UNIGRAM_ORDER)}
    specials = sorted(dict.fromkeys(t for t in names.values() if t is not None), key=lambda t: order.get(t, len(order)))
    # the trainer needs room for the alphabet besides the special tokens
    vocab_size = _check_vocab_size(vocab_size, fn, len(specials) + sentinels + 64,
                                   f"{len(specials)} special tokens, {sentinels} sentinels and an alphabet of 64")
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - sentinels,
        special_tokens=specials,
        unk_token=names["unk"],
        initial_alphabet=[chr(c) for c in range(33, 127)],  # printable ASCII, seen in the texts or not
        show_progress=show_progress,
    )
    _train(backend, trainer, source, fn)
    # <extra_id_{n-1}> first, so <extra_id_0> gets the last id (T5's layout)
    backend.add_special_tokens([SENTINEL_FORMAT.format(i) for i in reversed(range(sentinels))])
    if names["eod"] is not None:  # so the saved tokenizer.json ends a text with </s> in transformers, as T5's does
        eod_id = backend.token_to_id(names["eod"])
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {names['eod']}", pair=f"$A {names['eod']} $B:1 {names['eod']}:1",
            special_tokens=[(names["eod"], eod_id)])
    return Tokenizer(backend, "sentencepiece", names)



# -------------------------------------------------------------------- loaders


def _require_file(path, fn: str, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"megacore.data.{fn}: {what} must be a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"megacore.data.{fn}: {what} {path} does not exist or is not a file")
    return path


def from_gpt2_files(
    vocab_json: str | os.PathLike,
    merges_txt: str | os.PathLike,
    *,
    special_tokens: Mapping[str, str | None] | None = None,
) -> Tokenizer:
    """Load a GPT-2-format byte-level BPE: ``vocab.json`` (token -> id) and ``merges.txt`` (one merge per line,
    an optional ``#version`` header), as written by OpenAI's GPT-2, Megatron-LM and :meth:`Tokenizer.save_vocab`.

    Special tokens: :data:`BPE_SPECIAL_TOKENS` overridden by ``special_tokens``; a named token the vocabulary
    lacks is appended after the last id (GPT-2's own vocab.json has ``<|endoftext|>`` = 50256, so nothing is
    appended for it). Returns a :class:`Tokenizer` of kind ``"bpe"``.
    """
    fn = "from_gpt2_files"
    vocab_json = _require_file(vocab_json, fn, "vocab_json")
    merges_txt = _require_file(merges_txt, fn, "merges_txt")
    try:
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"megacore.data.{fn}: {vocab_json} is not valid JSON: {e}") from e
    if not isinstance(vocab, dict) or not vocab or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
    ):
        raise ValueError(f"megacore.data.{fn}: {vocab_json} must be a non-empty JSON object of token -> int id")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"megacore.data.{fn}: the ids in {vocab_json} must be 0 .. {len(ids) - 1}, each once")
    try:
        model = models.BPE.from_file(str(vocab_json), str(merges_txt))
    except Exception as e:  # the Rust side raises a plain Exception naming the bad line
        raise ValueError(f"megacore.data.{fn}: cannot read {merges_txt} with {vocab_json}: {e}") from e
    backend = _byte_level_backend(model)
    names = _resolve_special_tokens(BPE_SPECIAL_TOKENS, special_tokens, fn)
    missing = [t for t in dict.fromkeys(names.values()) if t is not None and backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    return Tokenizer(backend, "bpe", names)


def from_wordpiece_vocab(
    vocab_txt: str | os.PathLike,
    *,
    lowercase: bool | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
) -> Tokenizer:
    """Load a BERT WordPiece vocabulary: ``vocab.txt``, one token per line, the line number being its id.

    Args:
        lowercase: whether to lower-case (and strip accents) before splitting, as BERT's "uncased" models do.
            None infers it: uncased when no ordinary token (special tokens aside) has an upper-case letter.
        special_tokens: role -> token overriding :data:`WORDPIECE_SPECIAL_TOKENS`; each named token must be in
            the vocabulary (ValueError otherwise; name it None to go without).

    Returns a :class:`Tokenizer` of kind ``"wordpiece"``; ``eod`` is ``[SEP]``.
    """
    fn = "from_wordpiece_vocab"
    vocab_txt = _require_file(vocab_txt, fn, "vocab_txt")
    try:
        tokens = vocab_txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"megacore.data.{fn}: {vocab_txt} is not UTF-8 (byte {e.start})") from e
    if not tokens:
        raise ValueError(f"megacore.data.{fn}: {vocab_txt} is empty")
    names = _resolve_special_tokens(WORDPIECE_SPECIAL_TOKENS, special_tokens, fn)
    vocab = set(tokens)
    missing = [t for t in names.values() if t is not None and t not in vocab]
    if missing:
        raise ValueError(
            f"megacore.data.{fn}: {vocab_txt} lacks the special tokens {missing}; name the right ones with "
            f"special_tokens={{role: token}} (None for a role it has no token for)"
        )
    if names["unk"] is None:
        raise ValueError(f"megacore.data.{fn}: WordPiece needs an unknown token (special_tokens['unk'] is None)")
    if lowercase is None:
        specials = {t for t in names.values() if t is not None}
        lowercase = not any(t != t.lower() for t in tokens if t not in specials and not _bracketed(t))
    try:
        model = models.WordPiece.from_file(str(vocab_txt), unk_token=names["unk"], max_input_chars_per_word=100)
    except Exception as e:
        raise ValueError(f"megacore.data.{fn}: cannot read {vocab_txt}: {e}") from e
    backend = _bert_backend(model, lowercase)
    _bert_post_processor(backend, names)
    return Tokenizer(backend, "wordpiece", names)


def _bracketed(token: str) -> bool:
    # Reserved tokens such as [unused0] or <S> do not tell whether the vocabulary is cased.
    return len(token) > 2 and token[0] + token[-1] in ("[]", "<>")


def _infer_kind(backend: tokenizers.Tokenizer) -> str:
    config = json.loads(backend.to_str())
    model_type = (config.get("model") or {}).get("type")
    pipeline = json.dumps([config.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")])
    if model_type == "WordPiece":
        return "wordpiece"
    if model_type == "BPE" and '"ByteLevel"' in pipeline:
        return "bpe"
    if '"Metaspace"' in pipeline or "\\u2581" in pipeline or "\u2581" in pipeline:
        return "sentencepiece"
    if model_type == "BPE":
        return "bpe-other"
    if model_type in ("Unigram", "WordLevel"):
        return model_type.lower()
    raise ValueError(f"megacore.data.from_tokenizer_json: unsupported model type {model_type!r}")


def _infer_special_tokens(backend: tokenizers.Tokenizer) -> dict[str, str | None]:
    vocab = backend.get_vocab(with_added_tokens=True)
    return {role: next((t for t in candidates if t in vocab), None) for role, candidates in _ROLE_CANDIDATES.items()}


def from_tokenizer_json(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` (any model the `tokenizers` library reads).

    Args:
        kind: one of :data:`KINDS`; None infers it from the model and its pipeline (WordPiece ->
            ``"wordpiece"``, BPE with byte-level pre-tokenization -> ``"bpe"``, a ``▁`` word marker ->
            ``"sentencepiece"``, other BPE -> ``"bpe-other"``, Unigram / WordLevel).
        special_tokens: role -> token; roles not given are inferred from conventional names in the vocabulary
            (``<|endoftext|>``/``</s>`` for eod, ``[PAD]``/``<pad>``, ``[CLS]``/``<s>``, ``[SEP]``/``</s>``,
            ``[MASK]``/``<mask>``, ``[UNK]``/``<unk>``), then the usual fallbacks (eod -> sep, pad -> eod).

    To load a tokenizer saved by megacore with its recorded roles, use :meth:`Tokenizer.load`.
    """
    fn = "from_tokenizer_json"
    path = _require_file(path, fn, "path")
    backend = _backend_from_file(path, fn)
    if kind is None:
        kind = _infer_kind(backend)
    elif kind not in KINDS:
        raise ValueError(f"megacore.data.{fn}: kind must be one of {KINDS}, got {kind!r}")
    names = _resolve_special_tokens(_infer_special_tokens(backend), special_tokens, fn)
    return Tokenizer(backend, kind, names)


# ---------------------------------------------------------------- sentencepiece without sentencepiece
#
# A sentencepiece `.model` is a serialized protobuf `ModelProto`. Converting one with the `tokenizers` or
# `transformers` converters needs the `sentencepiece` and `protobuf` packages; this reader needs neither: it
# decodes the few fields that define the tokenizer straight from the wire format (field numbers from
# sentencepiece_model.proto) and rebuilds sentencepiece's pipeline with `tokenizers` components.

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_UNIGRAM, _SP_BPE = 1, 2


class _ProtoError(ValueError):
    pass


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one protobuf message; bounds-checked."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        result = shift = 0
        while True:
            if i >= n:
                raise _ProtoError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _ProtoError("varint longer than 10 bytes")

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _ProtoError("field number 0")
        if wire == 0:
            value: int | bytes = varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > n:
                raise _ProtoError("truncated fixed-width field")
            value, i = buf[i : i + size], i + size
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise _ProtoError(f"field {field} claims {size} bytes, {n - i} remain")
            value, i = buf[i : i + size], i + size
        else:
            raise _ProtoError(f"unsupported wire type {wire} (field {field})")
        yield field, wire, value


def _read_sentencepiece_model(path: Path) -> dict:
    data = path.read_bytes()
    pieces: list[tuple[str, float, int]] = []
    trainer = {"model_type": _SP_UNIGRAM, "byte_fallback": False, "split_by_whitespace": True,
               "treat_whitespace_as_suffix": False, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}  # fmt: skip
    normalizer = {"precompiled_charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
                  "escape_whitespaces": True}  # fmt: skip
    trainer_fields = {3: "model_type", 22: "split_by_whitespace", 24: "treat_whitespace_as_suffix",
                      35: "byte_fallback", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}  # fmt: skip
    normalizer_fields = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for field, wire, value in _proto_fields(data):
        if field == 1 and wire == 2:
            piece, score, kind = None, 0.0, _SP_NORMAL
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            if piece is None:
                raise _ProtoError(f"piece {len(pieces)} has no text")
            pieces.append((piece, score, kind))
        elif field == 2 and wire == 2:
            for f, w, v in _proto_fields(value):
                if f in trainer_fields and w == 0:
                    # int32 fields are sign-extended to 64 bits on the wire (pad_id = -1).
                    trainer[trainer_fields[f]] = v - (1 << 64) if v >= 1 << 63 else v
        elif field == 3 and wire == 2:
            for f, w, v in _proto_fields(value):
                if f == 2 and w == 2:
                    normalizer["precompiled_charsmap"] = bytes(v)
                elif f in normalizer_fields and w == 0:
                    normalizer[normalizer_fields[f]] = bool(v)
    if not pieces:
        raise _ProtoError("no pieces (not a sentencepiece model)")
    return {"pieces": pieces, "trainer": trainer, "normalizer": normalizer}


def from_sentencepiece(
    model_file: str | os.PathLike,
    *,
    special_tokens: Mapping[str, str | None] | None = None,
) -> Tokenizer:
    """Load a sentencepiece model (``.model``, Unigram or BPE, as used by T5, ALBERT, Llama ...) without the
    `sentencepiece` package: the file's protobuf is decoded here and rebuilt with `tokenizers` components
    (normalization charsmap, whitespace handling, ``▁`` word marker, byte fallback, control and user-defined
    symbols).

    Special tokens: ``eod`` is the model's eos piece, ``unk`` its unk piece, ``pad`` its pad piece (when
    ``pad_id`` >= 0); ``cls`` / ``sep`` / ``mask`` are inferred by name as in :func:`from_tokenizer_json`;
    ``special_tokens`` overrides any of them. Returns a :class:`Tokenizer` of kind ``"sentencepiece"``.

    Raises FileNotFoundError, ValueError for a file that is not a sentencepiece model, NotImplementedError
    for the model types (word, char) and options (whitespace as suffix) it does not rebuild.
    """
    fn = "from_sentencepiece"
    model_file = _require_file(model_file, fn, "model_file")
    try:
        spec = _read_sentencepiece_model(model_file)
    except (_ProtoError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"megacore.data.{fn}: {model_file} is not a valid sentencepiece model: {e}") from e
    pieces, trainer, norm = spec["pieces"], spec["trainer"], spec["normalizer"]
    if trainer["model_type"] not in (_SP_UNIGRAM, _SP_BPE):
        raise NotImplementedError(
            f"megacore.data.{fn}: {model_file} is a sentencepiece model of type {trainer['model_type']} "
            "(word or char); only Unigram (1) and BPE (2) are supported"
        )
    if trainer["treat_whitespace_as_suffix"]:
        raise NotImplementedError(f"megacore.data.{fn}: {model_file} treats whitespace as a suffix (not supported)")

    def piece_at(index: int) -> str | None:
        return pieces[index][0] if 0 <= index < len(pieces) else None

    unk_token = piece_at(trainer["unk_id"])
    if unk_token is None:
        raise ValueError(f"megacore.data.{fn}: {model_file}: unk_id {trainer['unk_id']} is not a piece")
    byte_fallback = bool(trainer["byte_fallback"])
    if trainer["model_type"] == _SP_UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=trainer["unk_id"], byte_fallback=byte_fallback)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        # sentencepiece's BPE applies merges in the order of the merged piece's id; every piece that splits
        # into two pieces of the vocabulary is such a merge.
        merges = []
        for piece, merged_id in vocab.items():
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    merges.append((merged_id, vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(
            vocab, [(m[3], m[4]) for m in merges], unk_token=unk_token, fuse_unk=True, byte_fallback=byte_fallback
        )
    backend = tokenizers.Tokenizer(model)

    steps = []
    if norm["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(norm["precompiled_charsmap"]))
    if norm["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    if norm["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    if trainer["split_by_whitespace"]:
        # Pieces never span a word boundary: split before each '▁' (the text is already escaped).
        backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    steps = [decoders.Replace("\u2581", " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm["add_dummy_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)

    control = [p for p, _, t in pieces if t == _SP_CONTROL]
    user_defined = [p for p, _, t in pieces if t == _SP_USER_DEFINED]
    if user_defined:
        backend.add_tokens(user_defined)  # sentencepiece matches these verbatim in the text
    inferred = _infer_special_tokens(backend)
    names = {
        "eod": piece_at(trainer["eos_id"]),
        "pad": piece_at(trainer["pad_id"]),
        "cls": inferred["cls"],
        "sep": inferred["sep"],
        "mask": inferred["mask"],
        "unk": unk_token,
    }
    names = _resolve_special_tokens(names, special_tokens, fn)
    if control:
        backend.add_special_tokens(control)
    return Tokenizer(backend, "sentencepiece", names)
