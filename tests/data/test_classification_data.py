"""megacore.data.classification: labelled files (formats, keys, errors naming file:line), label ids, the three
embedded tasks (splits disjoint, sizes and classes pinned, deterministic) and the encoding a classifier reads
(formats with and without [CLS]/[SEP], truncation as transformers' longest_first, word-level tag alignment as
transformers' word_ids)."""

from __future__ import annotations

import json
import lzma
import re

import pytest
import torch

from megacore.data import (
    LabeledExample,
    LabelSet,
    austen_novel_examples,
    bible_pair_examples,
    bible_pairs,
    encode_examples,
    from_wordpiece_vocab,
    label_counts,
    majority_baseline,
    proper_noun_examples,
    read_labeled,
    train_bpe,
    train_wordpiece,
)
from megacore.data import classification
from megacore.data.classification import NOVEL_TITLES, chapter_split

# ---- read_labeled -----------------------------------------------------------------------------------------------


def test_jsonl_examples_keep_their_labels_pairs_and_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"sentence": "Good.", "other": "Fine.", "y": 1}, {"sentence": "Bad — ñ", "other": "Meh", "y": 0.5}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    got = read_labeled(path, text_key="sentence", pair_key="other", label_key="y")
    assert got == [LabeledExample("Good.", 1, "Fine.", None, f"{path}:1"),
                   LabeledExample("Bad — ñ", 0.5, "Meh", None, f"{path}:3")]  # blank lines keep the numbering
    assert read_labeled(path, "sentence", None, "y")[0].text_pair is None  # pair_key None: no second text
    with lzma.open(tmp_path / "b.json.xz", "wt") as f:
        f.write('{"text": "x", "label": "pos"}\n')
    assert read_labeled(tmp_path / "b.json.xz") == [LabeledExample("x", "pos", where=f"{tmp_path / 'b.json.xz'}:1")]


def test_jsonl_tagging_examples_have_words_and_a_tag_per_word(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"tokens": ["Mr.", "Darcy", "bowed"], "ner_tags": ["O", "NAME", "O"]}) + "\n")
    (e,) = read_labeled(path, text_key="tokens", label_key="ner_tags")
    assert (e.text, e.words, e.label) == ("Mr. Darcy bowed", ("Mr.", "Darcy", "bowed"), ("O", "NAME", "O"))


def test_csv_with_quoting_and_tsv_without(tmp_path):
    (tmp_path / "a.csv").write_text('id,label,text\n1,pos,"Well, ""Emma"" said"\n2,neg,"two\nlines"\n3,neg,x\n')
    a = read_labeled(tmp_path / "a.csv", pair_key=None)
    assert [(e.text, e.label) for e in a] == [('Well, "Emma" said', "pos"), ("two\nlines", "neg"), ("x", "neg")]
    assert [e.where.rsplit(":", 1)[1] for e in a] == ["2", "3", "5"]  # the line a row starts on
    (tmp_path / "b.tsv.xz").write_bytes(lzma.compress(b'sentence\tlabel\n"Yes," said he\t1\n'))
    (b,) = read_labeled(tmp_path / "b.tsv.xz", text_key="sentence")
    assert (b.text, b.label, b.text_pair) == ('"Yes," said he', "1", None)  # a quote is text in TSV; cells are str


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "a" "label": "x"}\n', r"a\.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n["a"]\n', r"a\.jsonl:2: expected a JSON object, got list"),
    ("a.jsonl", '{"text": "a", "lbl": "x"}\n', r"a\.jsonl:1: no field 'label' \(fields: lbl, text; pick them with"),
    ("a.jsonl", '{"text": " ", "label": "x"}\n', r"a\.jsonl:1: the 'text' text is empty"),
    ("a.jsonl", '{"text": 3, "label": "x"}\n', r"a\.jsonl:1: field 'text' is a int, expected text"),
    ("a.jsonl", '{"text": "a", "label": true}\n', r"a\.jsonl:1: the 'label' label is a bool, expected a class name"),
    ("a.jsonl", '{"text": "a", "label": null}\n', r"a\.jsonl:1: the 'label' label is a null"),
    ("a.jsonl", '{"text": "a", "label": NaN}\n', r"a\.jsonl:1: the 'label' label is nan, expected a finite number"),
    ("a.jsonl", '{"text": "a", "label": ""}\n', r"a\.jsonl:1: the 'label' label is empty"),
    ("a.jsonl", '{"text": ["a", "b"], "label": ["O"]}\n', r"a\.jsonl:1: 2 words under 'text' but 1 tags"),
    ("a.jsonl", '{"text": "a b", "label": ["O", "O"]}\n', r"a\.jsonl:1: a tagging example needs a list of words"),
    ("a.jsonl", '{"text": "a", "label": "x", "text_pair": "b"}\n{"text": "a", "label": "x"}\n',
     r"a\.jsonl:2: no 'text_pair' text, unlike the rows before it"),
    ("a.jsonl", "\n\n", r"a\.jsonl holds no examples"),
    ("a.jsonl", "", r"a\.jsonl holds no examples"),
    ("a.csv", "text,label\na,x\nb,y,z\n", r"a\.csv:3: 3 comma-separated fields, the header has 2"),
    ("a.csv", 'text,label\n"a"b,x\n', r"a\.csv:2: bad CSV row"),
    ("a.csv", 'text,label\na,x\n"b,y\n', r"a\.csv:3: bad CSV row \(unexpected end of data\)"),
    ("a.csv", "sentence,label\na,x\n", r"a\.csv:1: the header \['sentence', 'label'\] has no column 'text'"),
    ("a.csv", "text,label,text\na,x,b\n", r"a\.csv:1: the header .* names twice the column 'text'"),
    ("a.csv", "text,label\n", r"a\.csv holds no examples"),
    ("a.csv", "", r"a\.csv holds no examples \(not even a header row\)"),
    ("a.tsv", "text\tlabel\na\t\n", r"a\.tsv:2: the 'label' label is empty"),
    ("a.tsv", "text\tlabel\ta\tx\n", r"a\.tsv:1: the header .* has no column|holds no examples"),
    ("a.txt", "text\tlabel\n", r"cannot tell the format from the name: use \.jsonl / \.json \(JSON lines\), \.csv"),
])
def test_every_bad_row_is_named_by_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_labeled(tmp_path / name)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"read_labeled: .*missing\.csv does not exist"):
        read_labeled(tmp_path / "missing.csv")
    (tmp_path / "a.csv").write_bytes(b"text,label\n\xff,x\n")
    with pytest.raises(ValueError, match=r"a\.csv is not UTF-8 text"):
        read_labeled(tmp_path / "a.csv")
    with pytest.raises(ValueError, match=r"label_key='' must be a non-empty str"):
        read_labeled(tmp_path / "a.csv", label_key="")


# ---- labels -----------------------------------------------------------------------------------------------------


def test_label_sets_sort_names_and_read_numbers_and_text_alike():
    words = LabelSet.from_examples([LabeledExample("a", "pos"), LabeledExample("b", "neg"), LabeledExample("c", "pos")])
    assert words.names == ["neg", "pos"] and words.num_labels == 2 and words.id("pos") == 1
    numbers = LabelSet.from_examples([LabeledExample("a", "10"), LabeledExample("b", 2), LabeledExample("c", 1.0)])
    assert numbers.names == ["1", "2", "10"]  # by value, not as text
    assert numbers.id(1) == numbers.id("1") == numbers.id(1.0) == 0 and numbers.id("10") == 2
    tags = LabelSet.from_examples([LabeledExample("a b", ("O", "NAME"), words=("a", "b"))])
    assert tags.names == ["NAME", "O"]
    regression = LabelSet.from_examples([LabeledExample("a", "0.5"), LabeledExample("b", 3)], regression=True)
    assert regression.regression and regression.names == [] and regression.num_labels == 1
    with pytest.raises(ValueError, match=r"LabelSet\.id: f\.csv:7: label .maybe. is not one of the 2 labels \(neg"):
        words.id("maybe", where="f.csv:7")
    with pytest.raises(ValueError, match=r"from_examples: f:2: label 'x' is not a number \(regression\)"):
        LabelSet.from_examples([LabeledExample("a", "x", where="f:2")], regression=True)
    with pytest.raises(ValueError, match="no examples"):
        LabelSet.from_examples([])


def test_label_counts_and_the_majority_baseline():
    examples = [LabeledExample("a", "x"), LabeledExample("b", "y"), LabeledExample("c", "x"),
                LabeledExample("d e", ("x", "z"), words=("d", "e"))]
    assert label_counts(examples) == {"x": 3, "y": 1, "z": 1}  # a tagging example counts each tag
    assert list(label_counts(examples)) == ["x", "y", "z"]  # most common first, then by name
    assert majority_baseline(examples) == 3 / 5
    with pytest.raises(ValueError, match="no examples"):
        majority_baseline([])


# ---- the embedded tasks -----------------------------------------------------------------------------------------


def _chapter(example) -> tuple[str, int]:
    title, chapter, _ = example.where.split(", ")
    return title, int(chapter.split()[1])


def test_austen_novel_holds_out_whole_chapters_and_balances_the_evaluation_splits():
    splits = {s: austen_novel_examples(s) for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 10390, "valid": 816, "test": 822}
    assert label_counts(splits["train"]) == {"Emma": 2374, "Mansfield Park": 2334, "Pride and Prejudice": 1883,
                                             "Sense and Sensibility": 1562, "Persuasion": 1133,
                                             "Northanger Abbey": 1104}
    assert set(label_counts(splits["valid"]).values()) == {136} and set(label_counts(splits["test"]).values()) == {137}
    assert majority_baseline(splits["valid"]) == majority_baseline(splits["test"]) == pytest.approx(1 / 6)
    chapters = {s: {_chapter(e) for e in v} for s, v in splits.items()}
    for split, held in chapters.items():
        assert {chapter_split(n) for _, n in held} == {split}
        assert all(e.label == title for e in splits[split] for title, _ in [_chapter(e)])
    assert {n for _, n in chapters["valid"]} == {10, 20, 30, 40, 50, 60}
    assert {n for _, n in chapters["test"]} == {11, 21, 31, 41, 51, 61}
    assert not {e.text for e in splits["train"]} & {e.text for e in splits["valid"] + splits["test"]}
    assert {e.label for e in splits["train"]} == set(NOVEL_TITLES.values())
    # per novel, the chapter count of its edition (Emma's volumes run on)
    every = chapters["train"] | chapters["valid"] | chapters["test"]
    last = {t: max(n for tt, n in every if tt == t) for t in NOVEL_TITLES.values()}
    assert last == {"Emma": 55, "Mansfield Park": 48, "Northanger Abbey": 31, "Persuasion": 24,
                    "Pride and Prejudice": 61, "Sense and Sensibility": 50}
    assert len(every) == 269 and len(chapters["valid"]) == 25 and len(chapters["test"]) == 24
    first = splits["train"][0]
    assert first.where == "Emma, chapter 1, passage 1" and first.text.startswith("Emma Woodhouse, handsome, clever")
    texts = " ".join(e.text for e in splits["train"])
    assert "_" not in texts and "CHAPTER" not in texts and "Signet Classic" not in texts and "[" not in texts
    assert not re.search(r"\bMrs?\s", " ".join(e.text for e in splits["train"] if e.label == "Persuasion"))
    assert classification._austen_novel.__wrapped__("valid") == tuple(splits["valid"])  # rebuilt: the same


def test_bible_pair_is_balanced_with_hard_and_easy_mismatches_from_the_held_out_books():
    splits = {s: bible_pair_examples(s) for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 60150, "valid": 314, "test": 1690}
    for split, examples in splits.items():
        verses = bible_pairs(split)
        assert label_counts(examples) == {"mismatch": len(verses), "translation": len(verses)}
        assert majority_baseline(examples) == 0.5
        assert [e.text for e in examples[::2]] == [e.text for e in examples[1::2]] == [v.es for v in verses]
        assert [e.text_pair for e in examples[::2]] == [v.en for v in verses]
        assert [e.label for e in examples[:2]] == ["translation", "mismatch"]
        assert all(m.text_pair != t.text_pair for t, m in zip(examples[::2], examples[1::2]))
    books = {s: {e.where.rsplit(" ", 1)[0] for e in v[::2]} for s, v in splits.items()}
    assert books["valid"] == {"Ruth", "Jonah", "Phlm"} and books["test"] == {"Mark", "Esth"}
    where = re.compile(r"(.+) (\d+):(\d+) with the English of (.+) (\d+):(\d+)")
    for i, m in enumerate(splits["test"][1::2]):
        book, chapter, verse, book2, chapter2, verse2 = where.fullmatch(m.where).groups()
        # even positions: 2 or 3 verses away in the same chapter (hard); odd: another chapter of the split (easy)
        assert ((book, chapter) == (book2, chapter2)) == (i % 2 == 0)
        assert 2 <= abs(int(verse) - int(verse2)) <= 3 or i % 2 == 1
    assert classification._bible_pairs.__wrapped__("valid") == tuple(splits["valid"])  # the seeded draws repeat


def _tagged(sentence: str) -> list[tuple[str, str]]:
    words = classification._WORD.findall(sentence)
    return list(zip(words, classification._tags(words, classification._lexicon())))


def test_proper_nouns_tags_capitals_mid_sentence_and_sentence_starts_by_the_lexicon():
    names = lambda s: [w for w, t in _tagged(s) if t == "NAME"]  # noqa: E731
    assert names('"Emma," said Mr. Knightley, "I think Harriet is at Hartfield."') == \
        ["Emma", "Knightley", "Harriet", "Hartfield"]  # "Emma" after a quote: by the lexicon; Mr. and I never
    assert names("Long before Lady Russell came, Frank and Elinor walked to Barton Park.") == \
        ["Russell", "Frank", "Elinor", "Barton", "Park"]  # "Long" starts the sentence: lower-case in the lexicon
    assert names("Frank was there; Then the Colonel spoke to NOBODY.") == ["Frank"]  # titles; capitals go by lexicon
    assert names("Darcy's sister.") == ["Darcy's"]
    assert [w for w, _ in _tagged("Mr. Darcy's cat--well, don't.")] == \
        ["Mr.", "Darcy's", "cat", "--", "well", ",", "don't", "."]
    lexicon = classification._lexicon()
    assert {"emma", "frank", "god", "harriet"} <= lexicon and not {"long", "park", "street", "the"} & lexicon


def test_proper_noun_splits_are_the_austen_chapters_with_every_passage():
    splits = {s: proper_noun_examples(s) for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 10390, "valid": 1116, "test": 1111}
    assert {s: label_counts(v) for s, v in splits.items()} == {
        "train": {"O": 679437, "NAME": 21967}, "valid": {"O": 73849, "NAME": 2099}, "test": {"O": 73477, "NAME": 2321}}
    assert majority_baseline(splits["valid"]) == pytest.approx(73849 / 75948)
    assert [e.where for e in splits["train"]] == [e.where for e in austen_novel_examples("train")]
    assert {e.where for e in splits["valid"]} >= {e.where for e in austen_novel_examples("valid")}
    for e in splits["valid"][:50]:
        assert len(e.words) == len(e.label) and e.text.replace(" ", "").startswith("".join(e.words[:3]))


def test_unknown_splits_are_refused():
    for fn in (austen_novel_examples, bible_pair_examples, proper_noun_examples):
        with pytest.raises(ValueError, match=r"split must be one of \('train', 'valid', 'test'\), got 'dev'"):
            fn("dev")


# ---- encoding ---------------------------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "mr", ".", "darcy", "'", "s", ",", "emma",
         "el", "gato", "##s", "on", "mat", "wood", "##house", "a"]


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return from_wordpiece_vocab(path)


def _ids(*tokens):
    return [VOCAB.index(t) for t in tokens]


def test_wordpiece_format_single_and_pair_with_token_types_and_padding(wordpiece):
    labels = LabelSet(["neg", "pos"])
    ds = encode_examples([LabeledExample("Emma Woodhouse sat.", "pos"),
                          LabeledExample("The cat sat", "neg", text_pair="el gato")], wordpiece, 10, labels)
    one, two = ds[0], ds[1]
    assert one["input_ids"].tolist() == _ids("[CLS]", "emma", "wood", "##house", "sat", ".", "[SEP]") + [0] * 3
    assert one["attention_mask"].tolist() == [1] * 7 + [0] * 3 and one["token_type_ids"].tolist() == [0] * 10
    assert one["labels"].dtype == torch.int64 and one["labels"].shape == () and int(one["labels"]) == 1
    assert two["input_ids"].tolist() == _ids("[CLS]", "the", "cat", "sat", "[SEP]", "el", "gato", "[SEP]") + [0] * 2
    assert two["token_type_ids"].tolist() == [0] * 5 + [1] * 3 + [0] * 2
    assert {k: (v.dtype, tuple(v.shape)) for k, v in one.items()} == {
        "input_ids": (torch.int64, (10,)), "attention_mask": (torch.int64, (10,)),
        "token_type_ids": (torch.int64, (10,)), "labels": (torch.int64, ())}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == (2, 10) and batch["labels"].tolist() == [1, 0]
    assert ds.lengths.tolist() == [7, 8] and ds.truncated == 0 and len(ds) == 2


def test_regression_labels_are_float32_numbers(wordpiece):
    ds = encode_examples([LabeledExample("the cat", "0.5"), LabeledExample("a mat", 3)], wordpiece, 6, None,
                         regression=True)
    assert ds[0]["labels"].dtype == torch.float32 and ds[0]["labels"].item() == 0.5 and ds[1]["labels"].item() == 3
    with pytest.raises(ValueError, match=r"encode_examples: f:1: label 'high' is not a number \(regression\)"):
        encode_examples([LabeledExample("the cat", "high", where="f:1")], wordpiece, 6, None, regression=True)


def test_too_long_is_an_error_naming_the_example_unless_truncated(wordpiece):
    labels = LabelSet(["x"])
    long = LabeledExample("the cat sat on the mat", "x", text_pair="el gato", where="f.jsonl:3")
    with pytest.raises(ValueError, match=r"encode_examples: f\.jsonl:3: 11 tokens \(text 6, second text 2, 3 "
                                         r"special\), longer than seq_len 8; pass truncation=True"):
        encode_examples([long], wordpiece, 8, labels)
    ds = encode_examples([long, LabeledExample("the cat", "x")], wordpiece, 8, labels, truncation=True)
    # budget 5: the longer text is cut to 5 - 2 = 3 tokens, the shorter kept whole
    assert ds[0]["input_ids"].tolist() == _ids("[CLS]", "the", "cat", "sat", "[SEP]", "el", "gato", "[SEP]")
    assert ds.truncated == 1
    # both too long: half the budget each, the odd token to the longer ("tokenizers"' longest_first)
    assert classification._cut(6, 4, 5) == (3, 2) and classification._cut(4, 4, 5) == (2, 3)
    assert classification._cut(4, 6, 7) == (3, 4) and classification._cut(2, 9, 5) == (2, 3)
    single = encode_examples([LabeledExample("the cat sat on the mat", "x")], wordpiece, 5, labels, truncation=True)
    assert single[0]["input_ids"].tolist() == _ids("[CLS]", "the", "cat", "sat", "[SEP]")


def test_tags_sit_on_each_words_first_piece(wordpiece):
    labels = LabelSet(["NAME", "O"])
    example = LabeledExample("Emma Woodhouse sat.", ("NAME", "NAME", "O", "O"), words=("Emma", "Woodhouse", "sat", "."))
    item = encode_examples([example], wordpiece, 9, labels, head="token")[0]
    assert item["input_ids"].tolist() == _ids("[CLS]", "emma", "wood", "##house", "sat", ".", "[SEP]") + [0, 0]
    assert item["labels"].tolist() == [-100, 0, 0, -100, 1, 1, -100, -100, -100]
    cut = encode_examples([example], wordpiece, 4, labels, head="token", truncation=True)[0]
    assert cut["labels"].tolist() == [-100, 0, 0, -100]  # cut inside a word: its first piece keeps the tag


def test_encoding_errors_name_the_example(wordpiece):
    labels = LabelSet(["NAME", "O"])
    tagged = LabeledExample("Emma sat", ("NAME", "O"), words=("Emma", "sat"), where="p:1")
    with pytest.raises(ValueError, match=r"p:1: word 1 'sat': label 'X' is not one of the 2 labels"):
        encode_examples([LabeledExample("Emma sat", ("NAME", "X"), words=("Emma", "sat"), where="p:1")], wordpiece,
                        8, labels, head="token")
    with pytest.raises(ValueError, match=r"p:2: head='token' needs a tagging example"):
        encode_examples([LabeledExample("Emma", "NAME", where="p:2")], wordpiece, 8, labels, head="token")
    with pytest.raises(ValueError, match=r"p:1: head='sequence' needs one label per example, got 2 tags"):
        encode_examples([tagged], wordpiece, 8, labels)
    with pytest.raises(ValueError, match=r"p:3: label 'maybe' is not one of"):
        encode_examples([LabeledExample("a", "maybe", where="p:3")], wordpiece, 8, labels)
    with pytest.raises(ValueError, match=r"seq_len=3 leaves no room for the texts beside 3 special tokens"):
        encode_examples([LabeledExample("a", "O", text_pair="b")], wordpiece, 3, labels)
    with pytest.raises(ValueError, match=r"head must be one of \('sequence', 'token'\)"):
        encode_examples([tagged], wordpiece, 8, labels, head="tokens")
    with pytest.raises(ValueError, match=r"regression needs head='sequence'"):
        encode_examples([tagged], wordpiece, 8, labels, head="token", regression=True)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(['Mr. Darcy\'s cat, "Emma" sat. Emma Woodhouse, handsome, clever, and rich. ' * 30],
                     vocab_size=300)


def test_byte_level_bpe_format_ends_texts_with_eod_and_keeps_the_texts_spacing(bpe):
    labels = LabelSet(["x"])
    ds = encode_examples([LabeledExample("Emma sat.", "x"), LabeledExample("Emma sat.", "x", text_pair="clever")],
                         bpe, 24, labels)
    a, b = bpe.encode("Emma sat."), bpe.encode("clever")
    assert ds.lengths.tolist() == [len(a) + 1, len(a) + len(b) + 2]
    assert ds[1]["input_ids"][:len(a) + len(b) + 2].tolist() == a + [bpe.eod] + b + [bpe.eod]
    assert ds[1]["token_type_ids"].tolist() == [0] * 24  # GPT-2's token types would index its word embeddings
    assert ds[0]["input_ids"][len(a) + 1:].tolist() == [bpe.pad] * (23 - len(a))
    text = 'Mr. Darcy\'s cat, "Emma" sat.'
    words = ("Mr.", "Darcy's", "cat", ",", '"', "Emma", '"', "sat", ".")
    tagged = encode_examples([LabeledExample(text, ("O",) * 9, words=words)], bpe, 40, LabelSet(["O"]), head="token")
    assert tagged[0]["input_ids"][:tagged.lengths[0] - 1].tolist() == bpe.encode(text)  # the text's own pieces


def test_word_alignment_and_pairs_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    examples = proper_noun_examples("valid")[:40]
    tok = train_wordpiece([" ".join(e.text for e in proper_noun_examples("test")[:300])], vocab_size=400)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, pad_token="[PAD]", cls_token="[CLS]",
                                              sep_token="[SEP]")
    labels = LabelSet(["NAME", "O"])
    ds = encode_examples(examples, tok, 96, labels, head="token", truncation=True)
    for k, e in enumerate(examples):
        enc = hf(list(e.words), is_split_into_words=True, truncation=True, max_length=96, padding="max_length")
        previous, expected = None, []
        for w in enc.word_ids():  # transformers' token-classification recipe: the first piece of each word
            expected.append(-100 if w is None or w == previous else labels.id(e.label[w]))
            previous = w
        assert ds[k]["input_ids"].tolist() == enc["input_ids"] and ds[k]["labels"].tolist() == expected
    pairs = bible_pair_examples("valid")[:12]
    ds = encode_examples(pairs, tok, 48, LabelSet.from_examples(pairs), truncation=True)
    enc = hf([e.text for e in pairs], [e.text_pair for e in pairs], truncation="longest_first", max_length=48,
             padding="max_length", return_token_type_ids=True)
    for k in range(len(pairs)):
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert ds[k][key].tolist() == enc[key][k], key
    assert ds.truncated == sum(len(hf(e.text, e.text_pair)["input_ids"]) > 48 for e in pairs) > 0
