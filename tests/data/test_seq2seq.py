"""megacore.data.read_pairs / tokenize_pairs / Seq2SeqDataset: JSONL and TSV pairs (keys, xz, blank lines), errors
naming the file and line, samples padded and cut with their </s>, epochs shuffled from the seed, resumable."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest

from megacore.data import Seq2SeqDataset, TextPair, read_pairs, tokenize_pairs


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_jsonl_and_tsv_pairs_with_their_keys(tmp_path):
    rows = [{"document": "Un texto largo.", "summary": "Corto.", "id": 1}, {"document": "Otro — ñandú", "summary": "B"}]
    a = read_pairs(_jsonl(tmp_path / "a.jsonl", rows), "document", "summary")
    assert [(p.source, p.target) for p in a] == [("Un texto largo.", "Corto."), ("Otro — ñandú", "B")]
    assert a[1].where == f"{tmp_path / 'a.jsonl'}:2"
    (tmp_path / "b.tsv").write_text("id\ten\tes\n1\tIn the beginning\tEn el principio\n\n2\tLight\tLuz\n")
    b = read_pairs(tmp_path / "b.tsv", "es", "en")
    assert [(p.source, p.target) for p in b] == [("En el principio", "In the beginning"), ("Luz", "Light")]
    assert b[1].where.endswith("b.tsv:4")  # blank lines are skipped, line numbers are the file's
    with lzma.open(tmp_path / "c.jsonl.xz", "wt") as f:
        f.write(json.dumps({"source": "x", "target": "y"}) + "\n")
    assert read_pairs(tmp_path / "c.jsonl.xz") == [TextPair("x", "y", f"{tmp_path / 'c.jsonl.xz'}:1")]


@pytest.mark.parametrize("content, message", [
    ('{"source": "a", "target": "b"}\n{"source": "a" "target": "b"}\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"source": "a", "target": "b"}\n["a", "b"]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"source": "a", "tgt": "b"}\n', r"bad\.jsonl:1: no field 'target' \(fields: source, tgt; pick them with"),
    ('{"source": "a", "target": 3}\n', r"bad\.jsonl:1: field 'target' is a int, expected text"),
    ('{"source": "  ", "target": "b"}\n', r"bad\.jsonl:1: the 'source' text is empty"),
    ("\n\n", r"bad\.jsonl holds no pairs"),
])
def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_pairs(tmp_path / "bad.jsonl")


def test_bad_tsv_files_and_names(tmp_path):
    (tmp_path / "a.tsv").write_text("source\ttarget\nx\ty\tz\n")
    with pytest.raises(ValueError, match=r"a\.tsv:2: 3 tab-separated fields, the header has 2"):
        read_pairs(tmp_path / "a.tsv")
    (tmp_path / "b.tsv").write_text("src\ttgt\nx\ty\n")
    with pytest.raises(ValueError, match=r"b\.tsv:1: the header \['src', 'tgt'\] has no column 'source'"):
        read_pairs(tmp_path / "b.tsv")
    (tmp_path / "c.csv").write_text("source,target\n")
    with pytest.raises(ValueError, match=r"cannot tell the format from the name: use \.jsonl"):
        read_pairs(tmp_path / "c.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "d.jsonl").write_bytes(b'{"source": "\xff", "target": "b"}\n')
    with pytest.raises(ValueError, match="d.jsonl"):
        read_pairs(tmp_path / "d.jsonl")


class _Tok:
    eod, pad = 1, 0

    def encode_batch(self, texts):
        return [[3 + (ord(c) % 50) for c in t] for t in texts]


def test_tokenize_pairs_ends_both_sides_with_eos_and_puts_the_prefix_first():
    out = tokenize_pairs([TextPair("ab", "c")], _Tok(), source_prefix="p:")
    assert out == [([3 + ord("p") % 50, 3 + ord(":") % 50, 3 + ord("a") % 50, 3 + ord("b") % 50, 1],
                    [3 + ord("c") % 50, 1])]


def test_samples_are_padded_cut_with_their_eos_and_shuffled_per_epoch():
    pairs = [([5] * n + [1], [6] * (n % 4) + [1]) for n in range(1, 8)]
    evaluation = Seq2SeqDataset(pairs, 5, 3, pad=0)
    assert len(evaluation) == 7 and evaluation.truncated == 4  # sources of 5+ tokens or targets of 4 tokens
    item = evaluation[0]
    assert item["input_ids"].tolist() == [5, 1, 0, 0, 0] and item["attention_mask"].tolist() == [1, 1, 0, 0, 0]
    assert item["labels"].tolist() == [6, 1, -100]
    cut = evaluation[6]  # 7 tokens + </s> into 5; 3 + </s> into 3: the last kept token becomes </s>
    assert cut["input_ids"].tolist() == [5, 5, 5, 5, 1] and cut["labels"].tolist() == [6, 6, 1]
    train = Seq2SeqDataset(pairs, 5, 3, pad=0, num_samples=20, seed=3)
    order = [train.pair_index(i) for i in range(20)]
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:14]) == list(range(7))  # every pair once per epoch
    assert order[:7] != order[7:14] and order != list(range(20))
    again = Seq2SeqDataset(pairs, 5, 3, pad=0, num_samples=20, seed=3)
    assert [again.pair_index(i) for i in reversed(range(20))] == order[::-1]  # any access order, same samples
    assert [Seq2SeqDataset(pairs, 5, 3, 0, 20, seed=4).pair_index(i) for i in range(20)] != order
    with pytest.raises(IndexError, match="out of range"):
        train[20]
    with pytest.raises(ValueError, match="source_length=1 must be an int >= 2"):
        Seq2SeqDataset(pairs, 1, 3, 0)
    with pytest.raises(ValueError, match="no pairs"):
        Seq2SeqDataset([], 4, 3, 0)
