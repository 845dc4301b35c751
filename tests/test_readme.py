"""README.md's code runs as written: the front page's ```python blocks and its cheap ```bash commands.

The blocks are read from README.md when the tests run, so the page cannot drift from the code. Sizes are
shrunk only by the textual substitutions in SUBSTITUTIONS, each of which must still match: an edit to the
README that removes one fails here, and whoever edits the page revisits the list. Every command of a
```bash block is either run (``megacore info``, ``--help``, the data section's ``megacore prepare``) or
listed in NOT_RUN with the reason.

The python blocks are one tour, as a reader types them into one session: they run in order in one
namespace, in a directory where the data section's ``megacore prepare`` commands have run. The block that
needs several processes is introduced as a script of its own (``train.py``): it runs alone, as written,
under torchrun with 4 processes. Tracebacks name README.md and its line numbers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megacore.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (old, new, why). Applied to README.md's text before the blocks are extracted; each `old` must occur exactly once.
SUBSTITUTIONS = [
    ("x = torch.randn(8192, 4096,", "x = torch.randn(64, 4096,",
     "the tour's bias_gelu input: 64 rows, not 8192 (the same op; the block takes 8 s instead of 15 s)"),
    ("h = torch.randn(8192, 1024,", "h = torch.randn(64, 1024,",
     "the tour's bias_dropout_add / layer_norm input: 64 rows, not 8192"),
]

# Commands of the ```bash blocks that the tests do not run, each with the reason.
NOT_RUN = {
    "bash scripts/run.sh": "the 6.5-minute main job; tests/training/test_run.py runs it shrunk",
    "bash scripts/test.sh": "this test suite",
    "megacore generate --checkpoint runs/gpt-tiny/checkpoints --prompt 'It is a truth'":
        "needs the main job's checkpoint; tests/training/test_run.py runs generate on a shrunk run's",
    "megacore evaluate --checkpoint runs/gpt-tiny/checkpoints": "the same, for evaluate",
    "torchrun --nproc-per-node 4 -m megacore train --tensor-parallel-size 2":
        "a full training run; tests/training/test_run.py runs it shrunk under torchrun",
    "torchrun --nproc-per-node 8 -m megacore train --tensor-parallel-size 2 --pipeline-parallel-size 2 "
    "--use-distributed-optimizer":
        "a full training run on 8 processes; tests/training/test_run_pipeline.py runs it shrunk under torchrun",
    "megacore train --model bert-tiny": "a full training run; tests/training/test_run.py runs it shrunk",
    "megacore train --model electra-small": "a full training run; tests/training/test_run.py runs it shrunk",
    "megacore train --model t5-tiny": "a full training run; tests/training/test_t5_training.py runs it shrunk",
    "megacore finetune translation": "a full fine-tuning run; tests/training/test_t5_training.py runs it shrunk",
    "megacore finetune translation --checkpoint runs/t5-tiny/checkpoints --direction en-es":
        "the same, from a pretrained checkpoint (as the tests do)",
    "megacore finetune seq2seq --train train.jsonl --valid valid.jsonl --source-key document --target-key summary":
        "needs the user's files; tests/training/test_t5_training.py runs it on a JSONL file it writes",
    "megacore generate --checkpoint runs/finetune-translation/checkpoints --prompt 'Y dijo Dios: Sea la luz.' "
    "--beams 4": "needs the fine-tuning run's checkpoint; tests/training/test_t5_training.py runs it on a shrunk one",
    "megacore finetune austen-novel --checkpoint runs/bert-tiny/checkpoints":
        "a full fine-tuning run from the main job's BERT; tests/training/test_classification_training.py runs it shrunk",
    "megacore finetune bible-pair --checkpoint runs/electra-small/checkpoints":
        "the same task family on pairs; test_classification_training.py runs bible-pair shrunk",
    "megacore finetune proper-nouns --checkpoint runs/bert-tiny/checkpoints":
        "the same, tagging; test_classification_training.py runs proper-nouns shrunk",
    "megacore finetune classify --train train.csv --valid valid.jsonl --hf '~/models/my-bert'":
        "needs the user's files and model; test_classification_training.py runs classify on files it writes, and "
        "--hf on a directory transformers saves",
    "megacore predict --checkpoint runs/finetune-austen-novel/checkpoints --text 'Mr. Knightley smiled.' --top 3":
        "needs the fine-tuning run's checkpoint; test_classification_training.py predicts with a shrunk one",
    "megacore evaluate --checkpoint runs/finetune-austen-novel/checkpoints --task austen-novel":
        "the same, for evaluate --task",
}

DISTRIBUTED = "dist.init_process_group("  # marks the block that needs several processes
TIMEOUT = 300  # seconds: a hang fails instead of blocking the suite


def _readme_text() -> str:
    text = README.read_text()
    for old, new, _why in SUBSTITUTIONS:
        count = text.count(old)
        assert count == 1, (f"README.md: the test's substitution {old!r} -> {new!r} matches {count} times, expected "
                            "once; the README changed: update SUBSTITUTIONS in tests/test_readme.py")
        text = text.replace(old, new)
    return text


def _blocks(lang: str) -> list[tuple[int, str]]:
    """The ```lang blocks of README.md (after SUBSTITUTIONS), each as (line of its first code line, code)."""
    text = _readme_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if m.group(1) == lang:
            blocks.append((text.count("\n", 0, m.start(2)) + 1, m.group(2)))
    return blocks


def _commands() -> list[str]:
    """Every command of the ```bash blocks, comments dropped, normalized by shlex."""
    return [shlex.join(shlex.split(line, comments=True)) for _, code in _blocks("bash")
            for line in code.splitlines() if shlex.split(line, comments=True)]


def _is_cheap(command: str) -> bool:
    argv = shlex.split(command)
    return argv[0] == "megacore" and (argv[1:] == ["info"] or argv[-1] == "--help")


def _is_prepare(command: str) -> bool:
    return shlex.split(command)[:2] == ["megacore", "prepare"] and "--help" not in command


def _run_blocks_script(blocks: list[tuple[int, str]], prelude: str = "", epilogue: str = "") -> str:
    """A Python script that runs ``blocks`` in order in one namespace, each compiled under the name README.md
    at its own line numbers (a traceback points into the README)."""
    return (f"import json\nns = {{}}\nexec({prelude!r}, ns)\n"
            f"for line, code in json.loads({json.dumps(blocks)!r}):\n"
            f"    exec(compile('\\n' * (line - 1) + code, 'README.md', 'exec'), ns)\n"
            f"exec({epilogue!r}, ns)\n")


def test_every_substitution_still_matches_the_readme_once():
    _readme_text()


def test_every_bash_command_is_run_or_listed_as_not_run():
    commands = _commands()
    unknown = [c for c in commands if not (_is_cheap(c) or _is_prepare(c) or c in NOT_RUN)]
    assert not unknown, f"README.md has new commands: run them in tests/test_readme.py or add them to NOT_RUN: {unknown}"
    stale = sorted(set(NOT_RUN) - set(commands))
    assert not stale, f"NOT_RUN lists commands that README.md no longer has: {stale}"


@pytest.mark.parametrize("command", [c for c in _commands() if _is_cheap(c)])
def test_cheap_bash_command_exits_0(command, capsys):
    try:
        rc = main(shlex.split(command)[1:])
    except SystemExit as e:  # argparse's --help
        rc = e.code
    assert rc in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    """A directory where the data section's `megacore prepare` commands have run (`python -m megacore`).
    Its corpus.jsonl stands for the reader's own file."""
    root = tmp_path_factory.mktemp("readme")
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"It is a truth universally acknowledged, number {i}."}) + "\n")
    for command in filter(_is_prepare, _commands()):
        r = subprocess.run([sys.executable, "-m", "megacore", *shlex.split(command)[1:]], cwd=root,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, f"{command}: {r.stderr[-3000:]}"
    return root


def test_data_section_prepare_commands_write_their_datasets(readme_dir):
    for prefix in ("data/austen", "data/web"):
        assert (readme_dir / f"{prefix}.bin").is_file() and (readme_dir / f"{prefix}.idx").is_file()
    assert (readme_dir / "data" / "austen.tokenizer").is_dir()


def test_python_blocks_run_in_order_in_one_session(readme_dir):
    pytest.importorskip("transformers")  # the tour's to_hf / from_hf
    blocks = [(line, code) for line, code in _blocks("python") if DISTRIBUTED not in code]
    script = readme_dir / "tour.py"
    script.write_text(_run_blocks_script(blocks))
    r = subprocess.run([sys.executable, str(script)], cwd=readme_dir, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-5000:]
    assert (readme_dir / "ckpt" / "model.safetensors").is_file()  # save_hf_safetensors(model, "ckpt/")


def test_distributed_block_runs_under_torchrun_with_4_processes(tmp_path):
    blocks = _blocks("python")
    (index,) = [i for i, (_, code) in enumerate(blocks) if DISTRIBUTED in code]
    epilogue = ("assert out.shape == x_shard.shape, out.shape\n"
                "assert all(p.grad is not None for p in layer.parameters())\n"
                "open(f'rank{dist.get_rank()}.ok', 'w').close()\n"  # a file each: ranks' stdout lines interleave
                "dist.destroy_process_group()\n")
    script = tmp_path / "train.py"
    script.write_text(_run_blocks_script([blocks[index]], epilogue=epilogue))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                        str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == [f"rank{rank}.ok" for rank in range(4)]
