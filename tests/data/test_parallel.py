"""The embedded parallel corpus (Spanish-English Bible verses): package data, the book-level split, and the TSV
reader's errors."""

from __future__ import annotations

import lzma
from importlib import resources

import pytest

from megacore.data import VersePair, bible_pairs, read_bible_tsv
from megacore.data.parallel import BIBLE_FILE, TEST_BOOKS, VALID_BOOKS


def test_the_corpus_is_package_data_with_its_readme():
    packaged = resources.files("megacore.data").joinpath("corpus", "bible")
    assert {e.name for e in packaged.iterdir()} == {"bible_es_en.tsv.xz", "README.md"}
    assert "public domain" in packaged.joinpath("README.md").read_text(encoding="utf-8")
    assert BIBLE_FILE.is_file()


def test_the_split_holds_out_whole_books():
    train, valid, test, every = (bible_pairs(s) for s in ("train", "valid", "test", "all"))
    assert (len(train), len(valid), len(test), len(every)) == (30075, 157, 845, 31077)  # the README's counts
    assert {p.book for p in valid} == set(VALID_BOOKS) == {"Ruth", "Jonah", "Phlm"}
    assert {p.book for p in test} == set(TEST_BOOKS) == {"Mark", "Esth"}
    assert not {p.book for p in train} & (set(VALID_BOOKS) | set(TEST_BOOKS))
    assert len({p.book for p in every}) == 66
    assert bible_pairs() == train
    keys = [(p.book, p.chapter, p.verse) for p in every]
    assert len(set(keys)) == len(keys)  # no verse twice


def test_verses_are_aligned():
    first = bible_pairs("all")[0]
    assert first == VersePair("Gen", 1, 1, "EN el principio crió Dios los cielos y la tierra.",
                              "In the beginning, God created the heavens and the earth.")
    jonah = [p for p in bible_pairs("valid") if (p.book, p.chapter, p.verse) == ("Jonah", 3, 3)]
    assert len(jonah) == 1 and "Nineveh" in jonah[0].en and "Nínive" in jonah[0].es
    # lengths agree roughly, pair by pair (the README: ~0.2% outside 0.5-2)
    ratios = [len(p.es) / len(p.en) for p in bible_pairs("all")]
    assert sum(not 0.5 <= r <= 2 for r in ratios) / len(ratios) < 0.005


def test_unknown_split():
    with pytest.raises(ValueError, match=r"megacore.data.bible_pairs: split must be one of .*got 'dev'"):
        bible_pairs("dev")


@pytest.mark.parametrize("body, text", [
    ("book\\tchapter\\tverse\\ten\\tes\\n", "line 1: the header must be book chapter verse es en"),
    ("book\\tchapter\\tverse\\tes\\ten\\nGen\\t1\\t1\\tuno\\n", "line 2: 4 tab-separated fields, expected 5"),
    ("book\\tchapter\\tverse\\tes\\ten\\nGen\\t1\\t1\\tuno\\tone\\nGen\\tone\\t2\\tdos\\ttwo\\n",
     "line 3: chapter 'one' and verse '2' must be positive integers"),
    ("book\\tchapter\\tverse\\tes\\ten\\nGen\\t1\\t0\\tuno\\tone\\n", "line 2: chapter '1' and verse '0'"),
    ("book\\tchapter\\tverse\\tes\\ten\\nGen\\t1\\t1\\t \\tone\\n", "line 2: the es side is empty"),
    ("", "line 1: the header must be"),
])
def test_bad_files_name_the_file_and_line(tmp_path, body, text):
    path = tmp_path / "pairs.tsv"
    path.write_text(body.encode().decode("unicode_escape"), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"megacore.data.read_bible_tsv: .*pairs.tsv, {text}"):
        read_bible_tsv(path)


def test_reads_plain_and_xz_alike(tmp_path):
    body = "book\tchapter\tverse\tes\ten\nRuth\t1\t1\tAconteció\tIt happened\n"
    plain, packed = tmp_path / "a.tsv", tmp_path / "a.tsv.xz"
    plain.write_text(body, encoding="utf-8")
    packed.write_bytes(lzma.compress(body.encode()))
    assert read_bible_tsv(plain) == read_bible_tsv(packed) == [VersePair("Ruth", 1, 1, "Aconteció", "It happened")]
