"""`megacore prepare` never destroys what exists and bounds its memory: a failing, refused or killed
(`kill -9`) run leaves the previous dataset (.bin, .idx, tokenizer) byte for byte; the next run removes what a
killed one left; a symlinked PREFIX.tokenizer is replaced as a link, never followed; inputs without text are
one clear error."""

from __future__ import annotations

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
from megacore.data.prepare import PrepareError, prepare_dataset, tokenizer_path
from megacore.data.tokenizer import Tokenizer, train_bpe

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
