"""`megacore prepare` never destroys what exists and bounds its memory: a failing, refused or killed
(`kill -9`) run leaves the previous dataset (.bin, .idx, tokenizer) byte for byte; the next run removes what a
killed one left; a symlinked PREFIX.tokenizer is replaced as a link, never followed; inputs without text are
one clear error; a long document is tokenized in pieces, to exactly the tokens of the whole, in bounded
memory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megacore.data import IndexedDataset
from megacore.data.corpus import corpus_files, read_text
from megacore.data.prepare import PrepareError, _pieces, prepare_dataset, tokenizer_path
from megacore.data.tokenizer import Tokenizer, train_bpe, train_wordpiece

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def text():
    return read_text(corpus_files("valid")[0])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe([text[:50_000]], vocab_size=400).save(d)
    return d


def run(inputs, out, tok_dir, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda m: None)
    return prepare_dataset(inputs, out, tokenizer=tok_dir, **kw)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(prefix):
    """Every byte of a dataset: its .bin, .idx and tokenizer files."""
    prefix = str(prefix)
    files = {p: Path(p).read_bytes() for p in (prefix + ".bin", prefix + ".idx")}
    tok = tokenizer_path(prefix)
    files.update({str(f): f.read_bytes() for f in sorted(tok.rglob("*")) if f.is_file()})
    return files


def leftovers(directory, name="o"):
    """Staging directories of runs of prefix ``name`` in ``directory``."""
    return sorted(p for p in os.listdir(directory) if p.startswith(f".{name}.prepare-"))


# -- nothing that exists is removed before the new dataset is complete ------------------------------------------
def test_a_symlinked_tokenizer_is_replaced_as_a_link_and_what_it_points_to_is_untouched(tmp_path, tok_dir):
    f = write(tmp_path / "a.txt", "Some words here.")
    run([f], tmp_path / "o", tok_dir)
    users = tmp_path / "users_tokenizer"
    write(users / "tokenizer.json", "the user's own file")
    write(users / "notes.txt", "keep me")
    os.rename(tmp_path / "o.tokenizer", tmp_path / "moved.tokenizer")
    os.symlink(users, tmp_path / "o.tokenizer")

    messages = []
    run([f], tmp_path / "o", tok_dir, log=messages.append)

    assert sorted(p.name for p in users.iterdir()) == ["notes.txt", "tokenizer.json"]
    assert (users / "tokenizer.json").read_text() == "the user's own file"
    assert not (tmp_path / "o.tokenizer").is_symlink()
    assert (tmp_path / "o.tokenizer" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert IndexedDataset(tmp_path / "o").num_documents == 1
    assert any(f"{tmp_path / 'o.tokenizer'} was a link to {users}" in m for m in messages), messages
    assert leftovers(tmp_path) == []


def test_a_failure_before_the_commit_leaves_the_previous_dataset_byte_for_byte(tmp_path, tok_dir, monkeypatch):
    f = write(tmp_path / "a.txt", "Old text.")
    run([f], tmp_path / "o", tok_dir)
    before = snapshot(tmp_path / "o")
    write(tmp_path / "a.txt", "New text, other tokens.")

    def disk_full(self, directory):
        raise OSError(28, "No space left on device", str(directory))

    monkeypatch.setattr(Tokenizer, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run([f], tmp_path / "o", tok_dir)
    assert snapshot(tmp_path / "o") == before
    assert leftovers(tmp_path) == []


def test_a_failure_inside_the_commit_moves_the_old_files_back(tmp_path, tok_dir, monkeypatch):
    f = write(tmp_path / "a.txt", "Old text.")
    run([f], tmp_path / "o", tok_dir)
    before = snapshot(tmp_path / "o")
    write(tmp_path / "a.txt", "New text, other tokens.")
    replace = os.replace

    def no_new_index(src, dst):  # the last rename of the commit fails
        if str(dst) == str(tmp_path / "o.idx") and ".prepare-" in str(src) and "old" not in os.path.basename(src):
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", no_new_index)
    with pytest.raises(PrepareError, match=f"cannot move .*new.idx to {tmp_path / 'o.idx'} \\(Permission denied\\); "
                                           f"the previous dataset at {tmp_path / 'o'} is left as it was"):
        run([f], tmp_path / "o", tok_dir)
    assert snapshot(tmp_path / "o") == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name, make", [
    ("o.bin", lambda p: p.mkdir()),
    ("o.idx", lambda p: p.mkdir()),
    ("o.tokenizer", lambda p: p.write_text("a user's file")),
])
def test_output_names_holding_what_prepare_does_not_replace_are_refused_before_any_work(tmp_path, tok_dir, name, make):
    f = write(tmp_path / "a.txt", "Some text.")
    run([f], tmp_path / "o", tok_dir)
    target = tmp_path / name
    os.replace(target, tmp_path / "moved") if target.is_file() else __import__("shutil").rmtree(target)
    make(target)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PrepareError, match=f"megacore prepare: {target} is a (directory|file), where the"):
        run([f], tmp_path / "o", tok_dir)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_dead_runs_staging_is_removed_and_a_live_or_foreign_runs_kept(tmp_path, tok_dir):
    import megacore.data.prepare as prep

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()
    stale = tmp_path / f".o.prepare-{prep._HOST}-{dead.pid}-abc123_x"
    running = tmp_path / f".o.prepare-{prep._HOST}-{live}-def456"
    foreign = tmp_path / f".o.prepare-other-host-{dead.pid}-ghi789"
    other_prefix = tmp_path / f".o2.prepare-{prep._HOST}-{dead.pid}-jkl012"
    for d in (stale, running, foreign, other_prefix):
        write(d / "new.bin", "x")
    messages = []
    run([write(tmp_path / "a.txt", "Some text.")], tmp_path / "o", tok_dir, log=messages.append)
    assert not stale.exists() and running.exists() and foreign.exists() and other_prefix.exists()
    assert messages == [f"megacore prepare: removed {stale}, left by an interrupted run"]


@pytest.mark.slow
def test_a_killed_prepare_leaves_the_previous_dataset_and_the_next_run_cleans_up(tmp_path, tok_dir, text):
    """Real `kill -9`s of `python -m megacore prepare` at random moments while it works: each time the previous
    dataset (the same inputs, so any finished run writes the same bytes) still reads the same; the next run
    removes what the killed one left, and a run to the end succeeds and leaves nothing else."""
    f = write(tmp_path / "a.txt", text)
    run([f], tmp_path / "o", tok_dir, document_unit="line")
    before = snapshot(tmp_path / "o")
    tokens = [IndexedDataset(tmp_path / "o")[i].tolist() for i in (0, 100, -1)]
    command = [sys.executable, "-m", "megacore", "prepare", str(f), "-o", str(tmp_path / "o"), "--tokenizer",
               str(tok_dir), "--document-unit", "line", "--no-progress"]
    rng = random.Random(11)
    killed_mid_run = 0
    for _ in range(3):
        proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not leftovers(tmp_path) or leftovers(tmp_path)[-1].split("-")[-2] != str(proc.pid):
                if proc.poll() is not None:
                    break
                time.sleep(0.01)
            else:
                assert len(leftovers(tmp_path)) == 1  # the last killed run's staging went before this one's came
                time.sleep(rng.uniform(0, 0.5))
                killed_mid_run += proc.poll() is None
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
        assert snapshot(tmp_path / "o") == before
        ds = IndexedDataset(tmp_path / "o")
        assert [ds[i].tolist() for i in (0, 100, -1)] == tokens
    assert killed_mid_run >= 1
    r = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "o") == before
    assert leftovers(tmp_path) == []


# -- inputs without text ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, tokenizer", [
    ("", True),
    ("", False),  # training a tokenizer on nothing: the same message, not the trainer's
    ('{"text": ""}\n{"text": "  "}\n', True),
])
def test_an_input_without_text_is_one_error_line_naming_it_and_writes_nothing(tmp_path, tok_dir, capfd, content,
                                                                               tokenizer):
    from megacore.cli import main

    f = write(tmp_path / ("in.jsonl" if content else "in.txt"), content)
    out = tmp_path / "new" / "o"
    args = ["prepare", str(f), "-o", str(out), "--no-progress"] + (["--tokenizer", str(tok_dir)] if tokenizer else [])
    assert main(args) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: megacore prepare: no text to tokenize in {f} "), err
    assert err.rstrip().endswith("nothing written")
    assert sorted(os.listdir(tmp_path)) == [f.name]


# -- long documents: in pieces, the same tokens, bounded memory ------------------------------------------------
def tricky_text(n_chars: int, seed: int = 5) -> str:
    """Words with every kind of space around them: doubled spaces, tabs, newlines, CRLF, no-break and
    ideographic spaces, control characters, combining accents, CJK without spaces, digits, contractions,
    punctuation runs, a literal special token."""
    rng = random.Random(seed)
    words = ["Anne", "Elliot", "don't", "it's", "12345", "67890", "caf\u00e9", "cafe\u0301", "\u6c34\u6ce2\u5c71",
             "!!!", "...", "<|endoftext|>", "[SEP]", "\u00c9COLE", "\u03a3\u039f\u03a6\u0399\u0391\u03a3", "x\x00y",
             "\U0001f600", "end."]
    gaps = [" ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", " \n", "\n\n", "\u00a0", "\u00a0 ", "\u3000 ", "\x1c ",
            " \u00a0", "\u2028", "\u0301 "]
    parts, size = [], 0
    while size < n_chars:
        piece = rng.choice(words) + rng.choice(gaps)
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


def test_pieces_are_cut_before_a_space_that_follows_a_non_space_and_join_to_the_text():
    text = tricky_text(20_000) + "z" * 3000 + " tail"
    pieces = list(_pieces(text, 500))
    assert "".join(pieces) == text
    assert all(len(p) <= 500 for p in pieces)
    cut_at_a_word = [p for p in pieces[1:] if not p.startswith("z")]
    assert len(cut_at_a_word) > 30
    assert all(p[0] == " " for p in cut_at_a_word)
    ends = [p[-1] for p in pieces[:-1] if not p.endswith("z")]
    assert not any(c.isspace() for c in ends)
    # A stretch without such a space is cut at the limit.
    assert ["z" * 500] * 5 == [p for p in pieces if p == "z" * 500]
    # The premise of the cut: every Unicode White_Space character (the tokenizers' \s and
    # char::is_whitespace) is str.isspace, so a piece never ends inside a run of whitespace.
    white_space = [*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
                   0x205F, 0x3000]
    assert all(chr(c).isspace() for c in white_space)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece-uncased", "wordpiece-cased"])
def test_a_document_tokenized_in_pieces_has_exactly_the_tokens_of_the_whole(tmp_path, text, kind):
    # Trained on such text too, so the vocabulary has tokens for runs of whitespace ("ĠĠ"): a cut inside a run
    # would change them (cutting before any space does), a cut before a space after a non-space does not.
    corpus = [text[:100_000], tricky_text(100_000, seed=9)]
    if kind == "bpe":
        tok = train_bpe(corpus, vocab_size=500)
    else:
        tok = train_wordpiece(corpus, vocab_size=500, lowercase=kind.endswith("-uncased"))
    tok.save(tmp_path / "tok")
    doc = tricky_text(200_000)
    f = write(tmp_path / "d.jsonl", json.dumps({"text": doc}) + "\n" + json.dumps({"text": "Short one."}) + "\n")
    s = run([f], tmp_path / "o", tmp_path / "tok", piece_chars=700, chunk_chars=5000)
    ds = IndexedDataset(tmp_path / "o")
    assert s.documents == 2
    assert ds[0].tolist() == tok.encode(doc) + [tok.eod]
    assert ds[1].tolist() == tok.encode("Short one.") + [tok.eod]


def test_a_stretch_without_spaces_longer_than_a_piece_still_decodes_to_the_text(tmp_path, tok_dir):
    doc = "\u6c34\u6ce2" * 3000 + " and " + "x" * 5000
    f = write(tmp_path / "d.txt", doc)
    run([f], tmp_path / "o", tok_dir, piece_chars=1000)
    assert Tokenizer.load(tok_dir).decode(IndexedDataset(tmp_path / "o")[0][:-1]) == doc


def peak_rss_mb(command) -> float:
    """Peak resident memory (MB) of ``command``, measured in a fresh process so no earlier child counts."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "assert r.returncode == 0, r.stderr; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", probe, *command], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout) / 1024  # Linux: kilobytes


@pytest.mark.slow
def test_one_20_mib_document_is_prepared_in_bounded_memory(tmp_path, tok_dir, text):
    """The documented bound: the tokenizer's working memory stays under ~150 bytes x (chunk_chars +
    piece_chars) = 160 MB, the document itself costs about 5x its size (its text a few times, its tokens):
    under 160 MB + 8 x 20 MiB above the process's own memory, where encoding the document whole took 3.5 GB."""
    size = 20 << 20
    doc = (text * (size // len(text) + 1))[:size]
    big = write(tmp_path / "big.jsonl", json.dumps({"text": doc}) + "\n")
    small = write(tmp_path / "small.jsonl", json.dumps({"text": doc[:1000]}) + "\n")
    del doc

    def prepare(f):
        return [sys.executable, "-m", "megacore", "prepare", str(f), "-o", str(tmp_path / f.stem), "--tokenizer",
                str(tok_dir), "--no-progress"]

    baseline = peak_rss_mb(prepare(small))
    peak = peak_rss_mb(prepare(big))
    assert peak - baseline < 160 + 8 * 20, (baseline, peak)
    ds = IndexedDataset(tmp_path / "big")
    assert ds.num_documents == 1 and ds[0][-1] == Tokenizer.load(tok_dir).eod
    print(f"one {size >> 20} MiB document: peak {peak:.0f} MB, {peak - baseline:.0f} MB above {baseline:.0f} MB")
