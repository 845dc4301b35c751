"""`megacore prepare` end to end: the embedded corpus, text files, directories and JSONL -> .bin/.idx that read
back (with the spec reader of test_indexed) as exactly the tokenizer's tokens plus EOD; every bad-input case;
atomic output; merging."""

from __future__ import annotations

import json
import lzma
import os

import numpy as np
import pytest

from megacore.cli import main
from megacore.data import IndexedDataset
from megacore.data.corpus import corpus_files, read_text
from megacore.data.prepare import PrepareError, merge_datasets, prepare_dataset, split_sentences, tokenizer_path
from megacore.data.tokenizer import Tokenizer, train_bpe
from tests.data.test_indexed import spec_read


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE trained once on persuasion (the validation novel), saved like prepare saves it."""
    d = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe([read_text(corpus_files("valid")[0])], vocab_size=600).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def run(inputs, out, tok_dir, **kw):
    kw.setdefault("progress", False)
    return prepare_dataset(inputs, out, tokenizer=tok_dir, log=lambda m: None, **kw)


def write(path, text_or_bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
    path.write_bytes(data)
    return path


# -- the embedded corpus ----------------------------------------------------------------------------------------
def test_the_valid_split_of_the_embedded_corpus_is_persuasion_tokenized_plus_eod(tmp_path, tok_dir, tok):
    s = run(None, tmp_path / "p", tok_dir, split="valid")
    code, lengths, pointers, doc_idx, seqs = spec_read(tmp_path / "p")
    expected = tok.encode(read_text(corpus_files("valid")[0])) + [tok.eod]
    assert code == 8 and doc_idx == [0, 1] and seqs == [expected]
    assert (s.documents, s.sequences, s.tokens, s.skipped_empty) == (1, 1, len(expected), 0)
    assert Tokenizer.load(tokenizer_path(tmp_path / "p")).encode("Anne Elliot") == tok.encode("Anne Elliot")


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tok_dir):
    files = [tmp_path / f"d{i}.txt" for i in range(7)]
    text = read_text(corpus_files("valid")[0])
    for i, f in enumerate(files):
        write(f, text[i * 3000:(i + 1) * 3000 + 500 * i])
    one = run(files, tmp_path / "one", tok_dir, workers=1, document_unit="paragraph", chunk_chars=2000)
    two = run(files, tmp_path / "two", tok_dir, workers=2, document_unit="paragraph", chunk_chars=2000)
    assert one.documents == two.documents > 7
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()


def test_the_cli_trains_a_tokenizer_when_none_is_given_and_prints_a_summary(tmp_path, capsys):
    f = write(tmp_path / "a.txt", read_text(corpus_files("valid")[0])[:20000])
    assert main(["prepare", str(f), "--output", str(tmp_path / "o"), "--train-tokenizer", "wordpiece",
                 "--vocab-size", "300", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 documents (0 empty skipped)" in out and "tokens/s" in out
    t = Tokenizer.load(tmp_path / "o.tokenizer")
    assert t.kind == "wordpiece" and t.vocab_size <= 300
    ds = IndexedDataset(tmp_path / "o")
    assert ds.dtype == np.uint16 and ds[0][-1] == t.eod == t.sep
    assert ds[0][:-1].tolist() == t.encode(f.read_text())


def test_the_progress_bar_shows_documents_and_tokens_per_second(tmp_path, tok_dir, capsys):
    run([write(tmp_path / "a.txt", "Some text. " * 50)], tmp_path / "o", tok_dir, progress=True)
    err = capsys.readouterr().err
    assert "1 docs" in err and "tokens/s" in err


# -- document units, sentences, EOD -----------------------------------------------------------------------------
def test_document_units_file_paragraph_and_line(tmp_path, tok_dir, tok):
    f = write(tmp_path / "a.txt", "One line.\nSecond line.\n\n  \nNew paragraph.\r\n\r\nLast one.\n")
    by_unit = {}
    for unit in ("file", "paragraph", "line"):
        run([f], tmp_path / unit, tok_dir, document_unit=unit, append_eod=False)
        by_unit[unit] = [tok.decode(s.tolist()) for s in IndexedDataset(tmp_path / unit)]
    assert by_unit["file"] == [f.read_bytes().decode()]
    assert by_unit["paragraph"] == ["One line.\nSecond line.", "New paragraph.", "Last one."]
    assert by_unit["line"] == ["One line.", "Second line.", "New paragraph.", "Last one."]


def test_split_sentences_makes_one_sequence_per_sentence_with_eod_at_the_documents_end(tmp_path, tok_dir, tok):
    text = 'Mr. Darcy bowed. "Indeed!" said she. Was it so? It was.'
    assert split_sentences(text) == ["Mr. Darcy bowed.", '"Indeed!" said she.', "Was it so?", "It was."]
    f = write(tmp_path / "a.txt", text)
    s = run([f], tmp_path / "o", tok_dir, split_sentences=True)
    ds = IndexedDataset(tmp_path / "o")
    assert (len(ds), ds.num_documents, s.sequences) == (4, 1, 4)
    assert [s.tolist() for s in ds.document(0)] == [tok.encode(x) for x in split_sentences(text)[:3]] + [
        tok.encode("It was.") + [tok.eod]]


def test_no_eod(tmp_path, tok_dir, tok):
    run([write(tmp_path / "a.txt", "Hello there.")], tmp_path / "o", tok_dir, append_eod=False)
    assert IndexedDataset(tmp_path / "o")[0].tolist() == tok.encode("Hello there.")


class _BigVocab:
    """A stand-in tokenizer with 70,000 tokens: ids over uint16's range force int32."""
    vocab_size, eod = 70_000, 69_999

    def encode_batch(self, texts):
        return [[60_000 + ord(c) for c in t] for t in texts]

    def save(self, d):
        os.makedirs(d, exist_ok=True)


def test_a_vocabulary_of_65500_or_more_tokens_is_stored_as_int32(tmp_path):
    prepare_dataset([write(tmp_path / "a.txt", "abc")], tmp_path / "o", tokenizer=_BigVocab(), progress=False, log=print)
    ds = IndexedDataset(tmp_path / "o")
    assert ds.dtype == np.int32 and ds[0].tolist() == [60_097, 60_098, 60_099, 69_999]


# -- inputs: directories, xz, JSONL -----------------------------------------------------------------------------
def test_directories_are_searched_recursively_in_sorted_order_including_xz(tmp_path, tok_dir, tok):
    write(tmp_path / "in" / "b.txt", "second")
    write(tmp_path / "in" / "a" / "z.txt.xz", lzma.compress("first".encode()))
    write(tmp_path / "in" / "notes.md", "ignored")
    run([tmp_path / "in"], tmp_path / "o", tok_dir, append_eod=False)
    assert [tok.decode(s.tolist()) for s in IndexedDataset(tmp_path / "o")] == ["first", "second"]


def test_jsonl_with_a_configurable_key(tmp_path, tok_dir, tok):
    lines = [json.dumps({"body": "first doc", "id": 1}), "", json.dumps({"body": "second ü doc"})]
    f = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    s = run([f], tmp_path / "o", tok_dir, json_key="body")
    assert [x.tolist() for x in IndexedDataset(tmp_path / "o")] == [
        tok.encode("first doc") + [tok.eod], tok.encode("second ü doc") + [tok.eod]]
    assert s.documents == 2 and s.skipped_empty == 0


def test_jsonl_xz(tmp_path, tok_dir, tok):
    f = write(tmp_path / "d.jsonl.xz", lzma.compress(b'{"text": "packed"}\n'))
    run([f], tmp_path / "o", tok_dir, append_eod=False)
    assert IndexedDataset(tmp_path / "o")[0].tolist() == tok.encode("packed")


# -- bad input --------------------------------------------------------------------------------------------------
def assert_nothing_written(tmp_path, name="o"):
    left = [p for p in os.listdir(tmp_path) if p.startswith(name) or p.startswith("." + name)]
    assert left == [], left


def test_conflicting_tokenizer_options_are_refused(tmp_path, tok_dir):
    f = write(tmp_path / "a.txt", "text")
    with pytest.raises(PrepareError, match="--vocab-size is for a trained tokenizer"):
        run([f], tmp_path / "o", tok_dir, vocab_size=100)
    with pytest.raises(PrepareError, match="either --tokenizer or --train-tokenizer"):
        run([f], tmp_path / "o", tok_dir, train_tokenizer="bpe")
    assert_nothing_written(tmp_path)


def test_a_missing_input_is_a_clear_error(tmp_path, tok_dir):
    with pytest.raises(PrepareError, match="input .*nope.txt does not exist"):
        run([tmp_path / "nope.txt"], tmp_path / "o", tok_dir)
    assert_nothing_written(tmp_path)


def test_an_invalid_json_line_names_the_file_and_line(tmp_path, tok_dir):
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(PrepareError, match=r"d.jsonl:line 3: invalid JSON"):
        run([f], tmp_path / "o", tok_dir)
    assert_nothing_written(tmp_path)


def test_a_missing_field_names_the_file_line_and_field(tmp_path, tok_dir):
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(PrepareError, match=r"d.jsonl:line 2: no field 'text' \(has \['content'\]\)"):
        run([f], tmp_path / "o", tok_dir)
    f = write(tmp_path / "e.jsonl", '{"text": 5}\n')
    with pytest.raises(PrepareError, match=r"e.jsonl:line 1: field 'text' is a int, expected a string"):
        run([f], tmp_path / "o", tok_dir)
    assert_nothing_written(tmp_path)


def test_bad_json_lines_are_skipped_and_counted_with_errors_skip(tmp_path, tok_dir, tok):
    f = write(tmp_path / "d.jsonl", '{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n')
    s = run([f], tmp_path / "o", tok_dir, errors="skip", append_eod=False)
    assert [tok.decode(x.tolist()) for x in IndexedDataset(tmp_path / "o")] == ["a", "b"]
    assert s.skipped_errors == 2 and len(s.problems) == 2 and "line 2" in s.problems[0] and "line 3" in s.problems[1]
    assert "2 bad" in s.line()


def test_undecodable_bytes_are_reported_with_their_position(tmp_path, tok_dir):
    f = write(tmp_path / "a.txt", b"good line\nbad \xff byte\n")
    with pytest.raises(PrepareError, match=r"a.txt:line 2: undecodable bytes b'\\xff' at byte 14 .*--errors"):
        run([f], tmp_path / "o", tok_dir)
    g = write(tmp_path / "g.jsonl", b'{"text": "x"}\n{"text": "\xc3("}\n')
    with pytest.raises(PrepareError, match=r"g.jsonl:line 2: undecodable bytes b'\\xc3' at byte 24"):
        run([g], tmp_path / "o", tok_dir)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("policy,expected,counts", [
    ("replace", ["one", "bad \ufffd here", "three"], (3, 0, 1)),
    ("skip", ["one", "three"], (2, 1, 0)),
])
def test_undecodable_bytes_policy(tmp_path, tok_dir, tok, policy, expected, counts):
    f = write(tmp_path / "a.txt", b"one\nbad \xff here\nthree\n")
    s = run([f], tmp_path / "o", tok_dir, errors=policy, document_unit="line", append_eod=False)
    assert [tok.decode(x.tolist()) for x in IndexedDataset(tmp_path / "o")] == expected
    assert (s.documents, s.skipped_errors, s.replaced) == counts
    assert "line 2" in s.problems[0] and "byte 8" in s.problems[0]


def test_empty_documents_are_skipped_and_counted(tmp_path, tok_dir, tok):
    write(tmp_path / "in" / "a.txt", "text")
    write(tmp_path / "in" / "b.txt", "")
    write(tmp_path / "in" / "c.txt", " \n\t\n")
    write(tmp_path / "in" / "d.jsonl", '{"text": ""}\n{"text": "more"}\n')
    s = run([tmp_path / "in"], tmp_path / "o", tok_dir)
    assert (s.documents, s.skipped_empty) == (2, 3)
    assert "2 documents (3 empty skipped)" in s.line()
    assert IndexedDataset(tmp_path / "o").num_documents == 2


def test_the_cli_reports_bad_input_without_a_traceback(tmp_path, tok_dir, capsys):
    f = write(tmp_path / "d.jsonl", "{\n")
    assert main(["prepare", str(f), "-o", str(tmp_path / "o"), "--tokenizer", str(tok_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: megacore prepare: ") and "d.jsonl:line 1: invalid JSON" in err
    assert "Traceback" not in err


# -- atomic output ----------------------------------------------------------------------------------------------
def test_an_interrupted_run_leaves_the_previous_dataset_untouched(tmp_path, tok_dir, monkeypatch):
    import megacore.data.prepare as prep

    f = write(tmp_path / "a.txt", "old text")
    run([f], tmp_path / "o", tok_dir)
    before = {p: (tmp_path / p).read_bytes() for p in ("o.bin", "o.idx")}
    write(tmp_path / "a.txt", "new text")

    def interrupted(texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_tokenize_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([f], tmp_path / "o", tok_dir)
    assert {p: (tmp_path / p).read_bytes() for p in ("o.bin", "o.idx")} == before
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith((".o", "o"))) == ["o.bin", "o.idx", "o.tokenizer"]


def test_an_interrupt_while_writing_the_index_leaves_the_previous_dataset_whole(tmp_path, tok_dir, monkeypatch):
    import megacore.data.indexed as indexed

    f = write(tmp_path / "a.txt", "old text")
    run([f], tmp_path / "o", tok_dir)
    before = {p: (tmp_path / p).read_bytes() for p in ("o.bin", "o.idx")}
    write(tmp_path / "a.txt", "new text")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexed, "write_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([f], tmp_path / "o", tok_dir)
    assert {p: (tmp_path / p).read_bytes() for p in ("o.bin", "o.idx")} == before
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith((".o", "o"))) == ["o.bin", "o.idx", "o.tokenizer"]


def test_a_bad_line_read_while_workers_run_stops_the_pool_and_writes_nothing(tmp_path, tok_dir):
    f = write(tmp_path / "d.jsonl", '{"text": "a"}\n' * 50 + '{"text": 1}\n')
    with pytest.raises(PrepareError, match="line 51"):
        run([f], tmp_path / "o", tok_dir, workers=2, chunk_docs=4)
    assert_nothing_written(tmp_path)


class _FailingTokenizer(_BigVocab):
    def encode_batch(self, texts):
        if any("poison" in t for t in texts):
            raise ValueError("cannot tokenize this")
        return super().encode_batch(texts)


def test_an_error_inside_a_worker_reaches_the_caller_and_writes_nothing(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a"}\n' * 20 + '{"text": "poison"}\n' + '{"text": "a"}\n' * 20)
    with pytest.raises(ValueError, match="cannot tokenize this"):
        prepare_dataset([f], tmp_path / "o", tokenizer=_FailingTokenizer(), workers=2, chunk_docs=3, progress=False,
                log=lambda m: None)
    assert_nothing_written(tmp_path)


# -- merging ----------------------------------------------------------------------------------------------------
def test_merging_equals_preparing_the_inputs_together(tmp_path, tok_dir, capsys):
    a = write(tmp_path / "a.txt", "First file.\n\nTwo paragraphs.")
    b = write(tmp_path / "b.txt", "Second file.")
    run([a], tmp_path / "pa", tok_dir, document_unit="paragraph")
    run([b], tmp_path / "pb", tok_dir, document_unit="paragraph")
    run([a, b], tmp_path / "both", tok_dir, document_unit="paragraph")
    assert main(["prepare", "--merge", str(tmp_path / "pa"), str(tmp_path / "pb"), "-o", str(tmp_path / "m")]) == 0
    assert "3 documents" in capsys.readouterr().out
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "both.bin").read_bytes()
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "both.idx").read_bytes()
    assert (tmp_path / "m.tokenizer" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_merging_datasets_of_different_tokenizers_is_refused(tmp_path, tok_dir):
    f = write(tmp_path / "a.txt", "Some words here.")
    run([f], tmp_path / "pa", tok_dir)
    prepare_dataset([f], tmp_path / "pb", train_tokenizer="bpe", vocab_size=300, progress=False, log=lambda m: None)
    with pytest.raises(PrepareError, match="differs from .*cannot be merged"):
        merge_datasets([tmp_path / "pa", tmp_path / "pb"], tmp_path / "m")
    with pytest.raises(PrepareError, match="nope.idx does not exist"):
        merge_datasets([tmp_path / "pa", tmp_path / "nope"], tmp_path / "m")
    assert_nothing_written(tmp_path, "m")


def test_the_benchmark_prints_a_row_per_corpus_and_worker_count(capsys):
    assert main(["bench", "prepare", "--quick", "--workers", "1", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| austen")]
    assert len(rows) == 4, out
    assert all(row.count("|") == 8 and row.endswith("x |") for row in rows)


def test_the_output_directory_is_created(tmp_path, tok_dir):
    out = tmp_path / "new" / "deeper" / "ds"
    s = run([write(tmp_path / "a.txt", "Some text.")], out, tok_dir)
    assert s.documents == 1 and out.with_suffix(".idx").is_file() and out.with_suffix(".bin").is_file()


def test_written_files_get_the_permissions_of_any_new_file(tmp_path, tok_dir):
    """Atomic writes go through temp files (0600 from tempfile): the results must still be readable by
    others as the umask allows, like any file the user creates."""
    import os
    import stat

    from megacore._files import umask

    expected = 0o666 & ~umask()
    out = tmp_path / "ds"
    run([write(tmp_path / "a.txt", "Some text.")], out, tok_dir)
    for f in (out.with_suffix(".bin"), out.with_suffix(".idx"), tmp_path / "ds.tokenizer" / "tokenizer.json"):
        assert stat.S_IMODE(os.stat(f).st_mode) == expected, f
