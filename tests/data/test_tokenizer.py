"""megacore.data.tokenizer: trained byte-level BPE round-trips text; WordPiece lower-cases and uses [UNK];
special tokens keep their roles and ids through save / load and every loader; the classic formats (GPT-2
vocab.json + merges.txt, BERT vocab.txt, tokenizer.json, sentencepiece .model written here byte by byte)
give the ids their format defines; bad input is a clear error."""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from megacore.data import (
    Tokenizer,
    corpus_files,
    from_gpt2_files,
    from_sentencepiece,
    from_tokenizer_json,
    from_wordpiece_vocab,
    read_text,
    bible_text,
    train_bpe,
    train_unigram,
    train_wordpiece,
)

VOCAB = 2000
ODD_TEXT = "Mr. Darcy\u2019s na\u00efve \u2603 caf\u00e9 \U0001F600\r\n\ttabs\x00nul  two  spaces \u4e2d\u6587\n"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(vocab_size=VOCAB)  # None: the embedded corpus's training split


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece([corpus_files("train")[0]], vocab_size=VOCAB)  # one novel, as a Path


@pytest.fixture(scope="module")
def persuasion():
    return read_text(corpus_files("valid")[0])  # held out from training


# ---------------------------------------------------------------- byte-level BPE


def test_bpe_trained_on_the_corpus_has_the_vocab_and_gpt2_special_tokens(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == VOCAB
    assert bpe.id_to_token(bpe.eod) == "<|endoftext|>"
    assert bpe.pad == bpe.eod  # GPT-2 has no padding token: pad is eod (masked out by the masks)
    assert bpe.cls is None and bpe.sep is None and bpe.mask is None and bpe.unk is None


def test_bpe_round_trips_held_out_and_arbitrary_text(bpe, persuasion):
    ids = bpe.encode(persuasion)
    assert bpe.decode(ids) == persuasion
    assert len(ids) < 0.4 * len(persuasion.encode("utf-8"))  # merges were learned: < 0.4 tokens per byte
    for text in (ODD_TEXT, "", " ", "\n\n", "a", "\u00ff" * 7):
        assert bpe.decode(bpe.encode(text)) == text


def test_encode_adds_no_special_tokens_and_decode_skips_none_by_default(bpe):
    ids = bpe.encode("It is a truth universally acknowledged")
    assert bpe.eod not in ids and bpe.encode("") == []
    with_eod = ids + [bpe.eod]
    assert bpe.decode(with_eod) == "It is a truth universally acknowledged<|endoftext|>"
    assert bpe.decode(with_eod, skip_special_tokens=True) == "It is a truth universally acknowledged"
    # A special token written in the text is that token, as in Hugging Face's tokenizers.
    assert bpe.encode("a<|endoftext|>b") == bpe.encode("a") + [bpe.eod] + bpe.encode("b")


def test_encode_batch_equals_encode(bpe, persuasion):
    texts = persuasion.split("\n\n")[:200] + ["", ODD_TEXT]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_decode_accepts_dataset_arrays_and_rejects_ids_outside_the_vocab(bpe):
    text = "Anne Elliot"
    ids = bpe.encode(text)
    assert bpe.decode(np.asarray(ids, dtype=np.uint16)) == text  # as read from a uint16 .bin
    assert bpe.decode(np.asarray(ids, dtype=np.int64)) == text
    with pytest.raises(ValueError, match=rf"Tokenizer.decode: ids\[1\] = {VOCAB} is outside \[0, {VOCAB}\)"):
        bpe.decode([ids[0], VOCAB])
    with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
        bpe.decode([-1])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        bpe.decode(np.zeros((2, 2), dtype=np.int32))


def test_encode_rejects_non_text(bpe):
    with pytest.raises(TypeError, match="Tokenizer.encode: text must be a str, got bytes"):
        bpe.encode(b"bytes")
    with pytest.raises(TypeError, match=r"encode_batch: texts\[1\] must be a str, got int"):
        bpe.encode_batch(["a", 3])
    with pytest.raises(TypeError, match="got one str"):
        bpe.encode_batch("not a list")


def test_bpe_word_starts(bpe):
    starts = bpe.word_starts()
    assert starts.shape == (VOCAB,) and starts.dtype == bool
    ids = bpe.encode("the unaccountably")
    assert [bool(starts[i]) for i in ids[1:]] == [True] + [False] * (len(ids) - 2)
    assert starts[bpe.eod]


def test_bpe_with_extra_special_tokens_gets_them_first():
    tok = train_bpe(["hello world " * 20], vocab_size=300, special_tokens={"pad": "<|pad|>", "mask": "<|mask|>"})
    assert (tok.eod, tok.pad, tok.mask) == (0, 1, 2)
    assert tok.encode("x<|mask|>") == tok.encode("x") + [tok.mask]


# ---------------------------------------------------------------- WordPiece


def test_wordpiece_special_tokens_come_first_and_eod_is_sep(wordpiece):
    assert wordpiece.kind == "wordpiece" and wordpiece.vocab_size == VOCAB
    assert (wordpiece.pad, wordpiece.unk, wordpiece.cls, wordpiece.sep, wordpiece.mask) == (0, 1, 2, 3, 4)
    assert [wordpiece.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert wordpiece.eod == wordpiece.sep


def test_wordpiece_lower_cases_strips_accents_and_adds_no_cls_sep(wordpiece):
    ids = wordpiece.encode("Emma Woodhouse")
    assert ids == wordpiece.encode("EMMA WOODHOUSE") == wordpiece.encode("emma woodhouse")
    assert wordpiece.cls not in ids and wordpiece.sep not in ids
    assert wordpiece.encode("caf\u00e9") == wordpiece.encode("cafe")
    assert wordpiece.decode(wordpiece.encode("Emma, said Mr. Knightley!")) == "emma, said mr. knightley!"


def test_wordpiece_uses_unk_for_what_it_cannot_spell(wordpiece):
    assert wordpiece.encode("\u2603") == [wordpiece.unk]  # a snowman is not in Emma
    assert wordpiece.encode("emma \u2603 emma") == wordpiece.encode("emma") + [wordpiece.unk] + wordpiece.encode("emma")


def test_wordpiece_splits_rare_words_into_continuation_pieces(wordpiece):
    ids = wordpiece.encode("unaccountableness")
    tokens = [wordpiece.id_to_token(i) for i in ids]
    assert len(tokens) > 1 and not tokens[0].startswith("##") and all(t.startswith("##") for t in tokens[1:])
    starts = wordpiece.word_starts()
    assert [bool(starts[i]) for i in ids] == [True] + [False] * (len(ids) - 1)


def test_cased_wordpiece_keeps_case():
    tok = train_wordpiece(["Emma emma EMMA Emma emma. " * 30], vocab_size=200, lowercase=False)
    assert tok.encode("Emma") != tok.encode("emma")


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", ["bpe", "wordpiece"])
def test_save_load_keeps_ids_kind_and_special_tokens(name, request, tmp_path, persuasion):
    tok = request.getfixturevalue(name)
    directory = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in directory.iterdir()) == ["megacore_tokenizer.json", "tokenizer.json"]
    text = persuasion[:20_000]
    for loaded in (Tokenizer.load(directory), Tokenizer.load(directory / "tokenizer.json")):
        assert loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
        assert loaded.special_tokens == tok.special_tokens
        assert [getattr(loaded, r) for r in ("eod", "pad", "cls", "sep", "mask", "unk")] == [
            getattr(tok, r) for r in ("eod", "pad", "cls", "sep", "mask", "unk")
        ]
        assert loaded.encode(text) == tok.encode(text)
    # The tokenizer.json alone is a Hugging Face tokenizer with the same ids.
    plain = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert plain.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_save_load_keeps_custom_roles(tmp_path):
    tok = train_bpe(["hello world " * 20], vocab_size=300, special_tokens={"pad": "<|pad|>", "mask": "<|mask|>"})
    loaded = Tokenizer.load(tok.save(tmp_path))
    assert (loaded.eod, loaded.pad, loaded.mask) == (tok.eod, tok.pad, tok.mask) == (0, 1, 2)


def test_save_overwrites_atomically_and_leaves_no_temporary_files(bpe, wordpiece, tmp_path):
    bpe.save(tmp_path)
    wordpiece.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megacore_tokenizer.json", "tokenizer.json"]
    assert Tokenizer.load(tmp_path).kind == "wordpiece"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="Tokenizer.save: .*file exists and is not a directory"):
        bpe.save(tmp_path / "file")


def test_load_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="Tokenizer.load: .*missing does not exist"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    bpe.save(tmp_path)
    meta = tmp_path / "megacore_tokenizer.json"
    good = json.loads(meta.read_text())
    for change, message in [
        ({"kind": "gpt"}, "kind must be one of"),
        ({"format": "other"}, "is not a megacore tokenizer file"),
        ({"version": 99}, "has version 99"),
        ({"vocab_size": 5}, "do not belong together"),
        ({"special_tokens": {"eod": "<|nope|>"}}, r"special token '<\|nope\|>' \(eod\) is not in the vocabulary"),
        ({"special_tokens": {"bos": "<|endoftext|>"}}, "unknown special-token roles"),
    ]:
        meta.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message):
            Tokenizer.load(tmp_path)
    meta.write_text("[")
    with pytest.raises(ValueError, match="megacore_tokenizer.json is not valid JSON"):
        Tokenizer.load(tmp_path)


def test_constructor_rejects_bad_kind_and_backend(bpe):
    with pytest.raises(ValueError, match=r"megacore.data.Tokenizer: kind must be one of .* got 'gpt'"):
        Tokenizer(bpe.backend, "gpt")
    with pytest.raises(TypeError, match="backend must be a tokenizers.Tokenizer"):
        Tokenizer("tokenizer.json", "bpe")


# ---------------------------------------------------------------- training errors


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train_bpe: vocab_size=100 is too small: the byte alphabet \(256\)"):
        train_bpe(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match=r"train_wordpiece: vocab_size=10 is too small: .*alone need \d+"):
        train_wordpiece(["hello world, the cat sat on the mat"], vocab_size=10, min_frequency=1)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_bpe(["hello"], vocab_size="1000")
    with pytest.raises(ValueError, match="train_bpe: the training source is empty"):
        train_bpe([], vocab_size=1000)
    with pytest.raises(ValueError, match="contain no text"):
        train_wordpiece(["", "  \n"], vocab_size=1000)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=1000)
    with pytest.raises(TypeError, match=r"texts \(str\) or files \(pathlib.Path\), got int"):
        train_bpe([1, 2], vocab_size=1000)
    with pytest.raises(ValueError, match="unknown special-token role 'bos'"):
        train_bpe(["hello"], vocab_size=1000, special_tokens={"bos": "<s>"})


# ---------------------------------------------------------------- GPT-2 vocab.json + merges.txt


def test_gpt2_files_written_from_a_trained_tokenizer_give_the_same_ids(bpe, persuasion, tmp_path):
    paths = bpe.save_vocab(tmp_path)
    assert sorted(p.name for p in paths) == ["merges.txt", "vocab.json"]
    loaded = from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert loaded.kind == "bpe" and loaded.vocab_size == bpe.vocab_size and loaded.eod == bpe.eod == loaded.pad
    text = persuasion[:30_000]
    assert loaded.encode(text) == bpe.encode(text) and loaded.decode(loaded.encode(text)) == text


def _write_gpt2(directory: Path, vocab: dict, merges: list[str]) -> tuple[Path, Path]:
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return directory / "vocab.json", directory / "merges.txt"


def test_hand_written_gpt2_files_follow_the_merge_ranks(tmp_path):
    # 'Ġ' is byte-level BPE's space. Merge order: l+l, h+e, he+ll, hell+o, Ġ+w, Ġw+o.
    tokens = ["h", "e", "l", "o", "w", "Ġ", "ll", "he", "hell", "hello", "Ġw", "Ġwo"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = ["l l", "h e", "he ll", "hell o", "Ġ w", "Ġw o"]
    tok = from_gpt2_files(*_write_gpt2(tmp_path, vocab, merges))
    assert tok.encode("hello") == [9]
    assert tok.encode("hello wo") == [9, 11]
    assert tok.encode("hell") == [8] and tok.encode("ohe") == [3, 7]
    # The vocabulary has no <|endoftext|>: it is appended after the last id.
    assert tok.eod == tok.pad == len(tokens) and tok.vocab_size == len(tokens) + 1
    assert tok.decode([9, 11, tok.eod]) == "hello wo<|endoftext|>"


def test_gpt2_file_errors(tmp_path):
    vocab_path, merges_path = _write_gpt2(tmp_path, {"a": 0, "b": 1, "ab": 2}, ["a b"])
    with pytest.raises(FileNotFoundError, match=r"from_gpt2_files: vocab_json .*nope.json does not exist"):
        from_gpt2_files(tmp_path / "nope.json", merges_path)
    with pytest.raises(FileNotFoundError, match=r"from_gpt2_files: merges_txt .*nope.txt does not exist"):
        from_gpt2_files(vocab_path, tmp_path / "nope.txt")
    bad = tmp_path / "bad.json"
    bad.write_text("{'a': 0}")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        from_gpt2_files(bad, merges_path)
    bad.write_text(json.dumps({"a": 0, "b": 5}))
    with pytest.raises(ValueError, match=r"ids in .*bad.json must be 0 .. 1"):
        from_gpt2_files(bad, merges_path)
    bad.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="non-empty JSON object"):
        from_gpt2_files(bad, merges_path)
    (tmp_path / "m.txt").write_text("a c\n")  # 'c' is not in the vocabulary
    with pytest.raises(ValueError, match=r"from_gpt2_files: cannot read .*m.txt"):
        from_gpt2_files(vocab_path, tmp_path / "m.txt")


# ---------------------------------------------------------------- BERT vocab.txt


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "sat", ",", ".", "on", "mat"]


def test_hand_written_wordpiece_vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    tok = from_wordpiece_vocab(tmp_path / "vocab.txt")
    assert (tok.pad, tok.unk, tok.cls, tok.sep, tok.mask, tok.eod) == (0, 1, 2, 3, 4, 3)
    # Lower-casing was inferred (no upper-case token): "The" is "the".
    assert tok.encode("The cats sat on the mat.") == [5, 6, 7, 8, 11, 5, 12, 10]
    assert tok.encode("dog") == [tok.unk]
    assert tok.decode([5, 6, 7, 8]) == "the cats sat"


def test_wordpiece_vocab_casing_is_inferred(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(BERT_VOCAB + ["[unused0]", "The"]) + "\n")
    tok = from_wordpiece_vocab(tmp_path / "vocab.txt")
    assert tok.encode("The the") == [14, 5]
    assert from_wordpiece_vocab(tmp_path / "vocab.txt", lowercase=True).encode("The the") == [5, 5]


def test_wordpiece_vocab_written_from_a_trained_tokenizer_gives_the_same_ids(wordpiece, persuasion, tmp_path):
    (path,) = wordpiece.save_vocab(tmp_path)
    assert path.name == "vocab.txt"
    loaded = from_wordpiece_vocab(path)
    text = persuasion[:30_000]
    assert loaded.encode(text) == wordpiece.encode(text)
    assert loaded.special_tokens == wordpiece.special_tokens


def test_wordpiece_vocab_errors(tmp_path):
    path = tmp_path / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="from_wordpiece_vocab: vocab_txt .*vocab.txt does not exist"):
        from_wordpiece_vocab(path)
    path.write_text("")
    with pytest.raises(ValueError, match="vocab.txt is empty"):
        from_wordpiece_vocab(path)
    path.write_text("\n".join(t for t in BERT_VOCAB if t != "[MASK]"))
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        from_wordpiece_vocab(path)
    tok = from_wordpiece_vocab(path, special_tokens={"mask": None})  # a vocabulary without a mask token
    assert tok.mask is None and tok.cls == 2


# ---------------------------------------------------------------- tokenizer.json


def test_tokenizer_json_infers_kind_and_roles(bpe, wordpiece, tmp_path):
    for tok in (bpe, wordpiece):
        tok.backend.save(str(tmp_path / f"{tok.kind}.json"))
        loaded = from_tokenizer_json(tmp_path / f"{tok.kind}.json")
        assert loaded.kind == tok.kind and loaded.special_tokens == tok.special_tokens
    # A RoBERTa-style byte-level BPE: <s> is cls, </s> is sep and eod.
    roberta = tokenizers.Tokenizer(models.BPE())
    roberta.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    roberta.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    roberta.save(str(tmp_path / "roberta.json"))
    tok = from_tokenizer_json(tmp_path / "roberta.json")
    assert tok.kind == "bpe"
    assert (tok.cls, tok.pad, tok.sep, tok.eod, tok.unk, tok.mask) == (0, 1, 2, 2, 3, 4)
    level = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    level.save(str(tmp_path / "level.json"))
    tok = from_tokenizer_json(tmp_path / "level.json", special_tokens={"eod": "b"})
    assert tok.kind == "wordlevel" and (tok.eod, tok.pad, tok.unk) == (1, 1, 2)


def test_tokenizer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="from_tokenizer_json: path .*x.json does not exist"):
        from_tokenizer_json(tmp_path / "x.json")
    (tmp_path / "x.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ValueError, match="from_tokenizer_json: .*x.json is not a valid tokenizer.json"):
        from_tokenizer_json(tmp_path / "x.json")


# ---------------------------------------------------------------- sentencepiece .model


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are 10-byte varints
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def _sentencepiece_model(pieces, model_type=1, byte_fallback=False, pad_id=-1) -> bytes:
    """A ModelProto per sentencepiece_model.proto: pieces = 1 {piece = 1, score = 2 (float), type = 3},
    trainer_spec = 2 {model_type = 3, byte_fallback = 35, unk/bos/eos/pad_id = 40/41/42/43},
    normalizer_spec = 3 {name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4}."""
    out = b""
    for text, score, kind in pieces:
        body = _bytes_field(1, text.encode()) + _key(2, 5) + struct.pack("<f", score) + _key(3, 0) + _varint(kind)
        out += _bytes_field(1, body)
    trainer = (_key(3, 0) + _varint(model_type) + _key(35, 0) + _varint(int(byte_fallback))
               + _key(40, 0) + _varint(0) + _key(41, 0) + _varint(1) + _key(42, 0) + _varint(2)
               + _key(43, 0) + _varint(pad_id))  # fmt: skip
    normalizer = _bytes_field(1, b"identity") + _key(3, 0) + _varint(1) + _key(4, 0) + _varint(1)
    return out + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


SPECIALS = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
UNIGRAM = SPECIALS + [
    ("\u2581", -2.0, NORMAL), ("\u2581hello", -1.0, NORMAL), ("\u2581world", -1.5, NORMAL),
    ("h", -3.0, NORMAL), ("e", -3.0, NORMAL), ("l", -3.0, NORMAL), ("o", -3.0, NORMAL),
    ("\u2581he", -2.5, NORMAL), ("<0x78>", 0.0, BYTE),
]  # fmt: skip


def test_sentencepiece_unigram(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(_sentencepiece_model(UNIGRAM))
    tok = from_sentencepiece(path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == len(UNIGRAM)
    assert (tok.unk, tok.eod, tok.pad, tok.cls, tok.sep) == (0, 2, 2, 1, 2)  # pad_id -1: pad falls back to eod
    assert tok.encode("hello world") == [4, 5]
    assert tok.encode("  hello   world ") == [4, 5]  # remove_extra_whitespaces
    assert tok.encode("helo") == [10, 8, 9]  # the best segmentation: ▁he + l + o (-8.5) beats ▁ h e l o
    assert tok.encode("hex") == [10, 0]  # no byte fallback: x is <unk>
    assert tok.decode([4, 5]) == "hello world"
    assert tok.encode("") == []


def test_sentencepiece_unigram_byte_fallback(tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(_sentencepiece_model(UNIGRAM, byte_fallback=True))
    tok = from_sentencepiece(path)
    assert tok.encode("hex") == [10, 11]  # x is the byte piece <0x78>
    assert tok.decode([10, 11]) == "hex"


def test_sentencepiece_bpe_merges_follow_piece_ids(tmp_path):
    pieces = SPECIALS + [(p, -float(i), NORMAL) for i, p in enumerate(
        ["\u2581", "h", "e", "l", "o", "w", "r", "d", "ll", "\u2581h", "\u2581w", "or", "\u2581he", "llo",
         "\u2581hello", "\u2581wor", "ld", "\u2581world"])]  # fmt: skip
    path = tmp_path / "bpe.model"
    path.write_bytes(_sentencepiece_model(pieces, model_type=2, pad_id=0))
    tok = from_sentencepiece(path, special_tokens={"pad": None})
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    assert tok.encode("hello world") == [ids["\u2581hello"], ids["\u2581world"]]
    assert tok.encode("hold") == [ids["\u2581h"], ids["o"], ids["ld"]]
    assert tok.encode("hod") == [ids["\u2581h"], ids["o"], ids["d"]]
    assert tok.decode(tok.encode("hello hold world")) == "hello hold world"
    assert tok.pad == tok.eod == 2  # overridden: pad_id 0 is <unk>, not a padding token
    starts = tok.word_starts()
    assert starts[ids["\u2581hello"]] and not starts[ids["llo"]]


def test_sentencepiece_errors(tmp_path):
    path = tmp_path / "x.model"
    with pytest.raises(FileNotFoundError, match="from_sentencepiece: model_file .*x.model does not exist"):
        from_sentencepiece(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="x.model is not a valid sentencepiece model: no pieces"):
        from_sentencepiece(path)
    path.write_bytes(b"\x0f\xff\xff garbage")
    with pytest.raises(ValueError, match="is not a valid sentencepiece model"):
        from_sentencepiece(path)
    path.write_bytes(_sentencepiece_model(UNIGRAM, model_type=4))
    with pytest.raises(NotImplementedError, match="only Unigram .* and BPE .* are supported"):
        from_sentencepiece(path)


def test_truncated_sentencepiece_models_are_clear_errors(tmp_path):
    data = _sentencepiece_model(UNIGRAM)
    path = tmp_path / "cut.model"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        try:
            from_sentencepiece(path)  # a cut at a field boundary can still be a (smaller) valid model
        except ValueError as e:
            assert "from_sentencepiece" in str(e), e


def test_tokenizer_pickles_for_worker_processes(bpe):
    import pickle

    copy = pickle.loads(pickle.dumps(bpe))  # `megacore prepare` ships the tokenizer to its workers
    assert copy.kind == "bpe" and copy.eod == bpe.eod and copy.encode(ODD_TEXT) == bpe.encode(ODD_TEXT)


# ---------------------------------------------------------------- Unigram with sentinels (T5)


@pytest.fixture(scope="module")
def unigram():
    # bilingual: a novel and both sides of the Bible's validation books
    return train_unigram([corpus_files("train")[0], bible_text("valid", "es"), bible_text("valid", "en")],
                         vocab_size=VOCAB)


def test_unigram_has_t5s_special_ids_and_sentinels_at_the_end(unigram):
    assert unigram.kind == "sentencepiece" and unigram.vocab_size == VOCAB
    assert (unigram.pad, unigram.eod, unigram.unk) == (0, 1, 2)
    assert [unigram.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert unigram.sentinels == list(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> is the last id, as T5's
    assert unigram.id_to_token(unigram.sentinels[7]) == "<extra_id_7>"
    assert "sentinels=100" in repr(unigram)
    assert unigram.decode([unigram.sentinels[0]]) == "<extra_id_0>"
    # a sentinel written in the text is the sentinel, never pieces of it
    ids = unigram.encode("one <extra_id_3> two")
    assert unigram.sentinels[3] in ids


def test_unigram_round_trips_both_languages_up_to_nfkc_and_runs_of_spaces(unigram, persuasion):
    for text in (persuasion[:3000], "Y dijo Dios: Sea la luz; y fue la luz.", "And God said, Let there be light."):
        ids = unigram.encode(text)
        assert unigram.decode(ids) == re.sub(" {2,}", " ", unicodedata.normalize("NFKC", text)).strip(" ")
    spanish = unigram.encode("En el principio creó Dios los cielos y la tierra.")
    assert unigram.unk not in spanish and len(spanish) < 30  # it learned Spanish, accents included
    starts = unigram.word_starts()
    assert starts[unigram.encode("Elizabeth")[0]] and starts[unigram.sentinels[0]]


def test_unigram_saves_and_loads_with_its_sentinels_and_transformers_reads_it(unigram, tmp_path):
    unigram.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    assert again.sentinels == unigram.sentinels and again.special_tokens == unigram.special_tokens
    text = "Anne Elliot walked to Uppercross. <extra_id_0> la luz"
    assert again.encode(text) == unigram.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert hf(text)["input_ids"] == unigram.encode(text) + [unigram.eod]  # T5's tokenizers end a text with </s>


def test_unigram_without_sentinels_and_errors():
    plain = train_unigram([bible_text("valid", "en")], vocab_size=300, sentinels=0)
    assert plain.sentinels == [] and plain.vocab_size <= 300
    with pytest.raises(ValueError, match="sentinels=-1 must be an int >= 0"):
        train_unigram(["text"], sentinels=-1)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_unigram(["text"], vocab_size=100)
    with pytest.raises(ValueError, match="the training texts contain no text"):
        train_unigram(["  ", "\n"], vocab_size=300)


def test_sentinels_with_a_gap_are_refused():
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.add_special_tokens(["<extra_id_0>", "<extra_id_2>"])
    tok = Tokenizer(backend, "wordlevel", {"unk": "<unk>"})
    with pytest.raises(ValueError, match="has 2 sentinel tokens but not <extra_id_1>"):
        tok.sentinels
