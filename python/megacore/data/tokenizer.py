"""Tokenizers: one `Tokenizer` class over a Hugging Face `tokenizers.Tokenizer`, with megacore's special-token
conventions, trainers for byte-level BPE (GPT) and WordPiece (BERT / ELECTRA), and loaders for the common
formats.

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
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

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
WORDPIECE_SPECIAL_TOKENS = {"eod": None, "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "unk": "[UNK]"}
# Order of WordPiece's special tokens in a trained vocabulary (BERT's [PAD] is 0).
_WORDPIECE_ORDER = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

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

    def __init__(self, backend: tokenizers.Tokenizer, kind: str, special_tokens: Mapping[str, str | None] | None = None):
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

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={getattr(self, r)}" for r in ROLES if getattr(self, r) is not None)
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, {roles})"

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
        _write_atomic(directory / _JSON_FILE, self.backend.to_str(pretty=True))
        _write_atomic(directory / _META_FILE, json.dumps(meta, indent=2) + "\n")
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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    if cls_token and sep_token and backend.token_to_id(cls_token) is not None and backend.token_to_id(sep_token) is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls_token} $A {sep_token}",
            pair=f"{cls_token} $A {sep_token} $B:1 {sep_token}:1",
            special_tokens=[(cls_token, backend.token_to_id(cls_token)), (sep_token, backend.token_to_id(sep_token))],
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
        vocab_size, fn, len(alphabet) + len(specials), f"the byte alphabet ({len(alphabet)}) and {len(specials)} special token(s)"
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


# -------------------------------------------------------------------- loaders (filled in below)


def from_gpt2_files(*args, **kwargs):  # pragma: no cover - placeholder until the loaders land
    raise NotImplementedError("megacore.data.from_gpt2_files: not implemented yet")


from_wordpiece_vocab = from_tokenizer_json = from_sentencepiece = from_gpt2_files
