"""The embedded corpus: six Austen novels shipped as package data (in the wheel too), split train / valid,
decompressed transparently by read_text, with clear errors for missing, corrupt or undecodable files."""

from __future__ import annotations

import lzma
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from megacore.data import corpus_files, read_text
from megacore.data.corpus import CORPUS_DIR, NOVELS

ROOT = Path(__file__).resolve().parents[2]
TITLES = {
    "emma": "Emma",
    "mansfield_park": "Mansfield Park",
    "northanger_abbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "pride_and_prejudice": "Pride and Prejudice",
    "sense_and_sensibility": "Sense and Sensibility",
}


def _stems(paths):
    return [p.name.removesuffix(".txt.xz") for p in paths]


def test_valid_split_is_persuasion_and_train_is_the_other_five():
    assert _stems(corpus_files("valid")) == ["persuasion"]
    train = _stems(corpus_files("train"))
    assert len(train) == 5 and "persuasion" not in train
    assert sorted(train + ["persuasion"]) == sorted(_stems(corpus_files("all"))) == sorted(TITLES)
    assert corpus_files() == corpus_files("train")


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"megacore.data.corpus_files: split must be one of .* got 'test'"):
        corpus_files("test")


def test_files_are_package_data_of_the_installed_package():
    packaged = resources.files("megacore.data").joinpath("corpus", "austen")
    names = {entry.name for entry in packaged.iterdir()}
    assert names == {f"{n}.txt.xz" for n in NOVELS} | {"README.md"}
    assert all(p.parent == CORPUS_DIR and p.is_absolute() for p in corpus_files("all"))
    assert "public domain" in packaged.joinpath("README.md").read_text(encoding="utf-8")


def test_the_wheel_build_ships_the_corpus(tmp_path):
    # build_py is the step that copies packages and their package_data into the wheel.
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    shipped = tmp_path / "megacore" / "data" / "corpus" / "austen"
    assert sorted(p.name for p in shipped.iterdir()) == sorted([f"{n}.txt.xz" for n in NOVELS] + ["README.md"])
    bible = tmp_path / "megacore" / "data" / "corpus" / "bible"
    assert sorted(p.name for p in bible.iterdir()) == ["README.md", "bible_es_en.tsv.xz"]


@pytest.mark.parametrize("stem", sorted(TITLES))
def test_each_novel_decompresses_to_its_text(stem):
    (path,) = [p for p in corpus_files("all") if p.name == f"{stem}.txt.xz"]
    text = read_text(path)
    assert text.lstrip().lower().startswith(TITLES[stem].lower())
    assert "Austen" in text[:500]
    assert len(text.split()) > 70_000  # the shortest novel, Northanger Abbey, has ~77k words


def test_whole_corpus_size_matches_its_readme():
    texts = [read_text(p) for p in corpus_files("all")]
    words = sum(len(t.split()) for t in texts)
    size = sum(len(t.encode("utf-8")) for t in texts)
    assert 700_000 < words < 735_000  # README: ~717k words
    assert 3_900_000 < size < 4_150_000  # README: 4.0 MB of text


def test_read_text_reads_plain_and_xz_files_alike(tmp_path):
    text = "Emma Woodhouse, handsome, clever, and rich — naïve? ☃\n"
    (tmp_path / "plain.txt").write_text(text, encoding="utf-8")
    (tmp_path / "packed.txt.xz").write_bytes(lzma.compress(text.encode("utf-8")))
    (tmp_path / "misnamed.txt").write_bytes(lzma.compress(text.encode("utf-8")))  # xz is known by its magic
    for name in ("plain.txt", "packed.txt.xz", "misnamed.txt"):
        assert read_text(tmp_path / name) == text
        assert read_text(str(tmp_path / name)) == text


def test_read_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"megacore.data.read_text: .*nope.txt does not exist"):
        read_text(tmp_path / "nope.txt")


def test_read_text_truncated_xz_is_a_clear_error(tmp_path):
    data = lzma.compress(("word " * 10_000).encode())
    (tmp_path / "cut.xz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"megacore.data.read_text: .*cut.xz is a corrupt or truncated xz file"):
        read_text(tmp_path / "cut.xz")


def test_read_text_undecodable_bytes_name_file_and_position(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe more")
    with pytest.raises(UnicodeDecodeError, match=r"megacore.data.read_text: .*bad.txt, byte 10"):
        read_text(tmp_path / "bad.txt")
    assert read_text(tmp_path / "bad.txt", errors="replace") == "good text \ufffd\ufffd more"
    assert read_text(tmp_path / "bad.txt", errors="ignore") == "good text  more"
