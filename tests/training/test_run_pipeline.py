"""`megacore train` under torchrun with pipeline parallelism and the distributed optimizer: each layout's
per-step losses equal one process's (same seed, same global batch), checkpoints are written, and impossible
layouts are refused with one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megacore.cli import main
from megacore.training.run import TrainConfig, train

STEPS = 3
TINY = dict(train_steps=STEPS, seq_len=32, vocab_size=1000, micro_batch_size=2, global_batch_size=8, eval_interval=100,
            eval_batches=2, log_interval=1, save_interval=100, lr=5e-3, min_lr=5e-4, warmup_steps=1, progress=False,
            dtype="float32", model_overrides={"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4})


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# Each model reads the session's corpus of its tokenizer (1,000 tokens); T5's 4 encoder and 4 decoder layers are the
# pipeline's 8
T5 = dict(model_overrides=dict(TINY["model_overrides"], kv_channels=8))


def _options(model: str) -> dict:
    return dict(TINY, model=model, **(T5 if model.startswith("t5") else {}))


def _valid_loss(run) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in records if "valid_loss" in r][-1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_cache, wordpiece_corpus_cache, t5_corpus_cache):
    """The reference: each model's run in one process (losses, and T5's validation loss), and the corpus caches."""
    root = tmp_path_factory.mktemp("pipeline-cli")
    caches = {"gpt-tiny": corpus_cache, "bert-tiny": wordpiece_corpus_cache, "t5-tiny": t5_corpus_cache}
    runs = {}
    for model in ("gpt-tiny", "bert-tiny", "t5-tiny"):
        config = TrainConfig(cache_dir=caches[model], output=str(root / model), **_options(model))
        train(config, log=lambda m: None)
        runs[model] = _losses(root / model)
    runs["t5-tiny valid"] = _valid_loss(root / "t5-tiny")
    return root, runs, caches


def _torchrun(nproc: int, caches: dict, out, *flags: str, model: str = "gpt-tiny") -> subprocess.CompletedProcess:
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps(_options(model)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "megacore", "train", "--config", str(config), "--cache-dir",
                           caches[model], "--output", str(out), *flags],
                          capture_output=True, text=True, timeout=400, env=env)


LAYOUTS = {  # name: (processes, flags, model)
    "pp4": (4, ["--pipeline-parallel-size", "4"], "gpt-tiny"),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"], "gpt-tiny"),
    "pp2_interleaved": (2, ["--pipeline-parallel-size", "2", "--virtual-pipeline-parallel-size", "2"], "gpt-tiny"),
    "tp2_pp2_sequence_parallel": (4, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                      "--sequence-parallel"], "gpt-tiny"),
    "pp2_dp2_distributed_optimizer": (4, ["--pipeline-parallel-size", "2", "--use-distributed-optimizer"], "bert-tiny"),
    "tp2_pp2_dp2_distributed_optimizer": (8, ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                              "--use-distributed-optimizer"], "gpt-tiny"),
    # T5: the split falls at the encoder / decoder boundary; evaluation runs through the stages
    "t5_pp2": (2, ["--pipeline-parallel-size", "2"], "t5-tiny"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_torchrun_layout_trains_like_one_process(one_process, tmp_path, name):
    root, reference, caches = one_process
    nproc, flags, model = LAYOUTS[name]
    r = _torchrun(nproc, caches, tmp_path / "run", *flags, model=model)
    assert r.returncode == 0, r.stderr[-4000:]
    assert ("pipeline-parallel" in r.stdout) == ("--pipeline-parallel-size" in flags) and "validation loss" in r.stdout
    assert ("(distributed optimizer)" in r.stdout) == ("distributed_optimizer" in name)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert _losses(tmp_path / "run") == pytest.approx(reference[model], rel=2e-4)
    if model == "t5-tiny":
        assert _valid_loss(tmp_path / "run") == pytest.approx(reference["t5-tiny valid"], rel=2e-4)


@pytest.mark.parametrize("argv, message", [
    (["--pipeline-parallel-size", "3"], "megacore train: gpt-tiny has 4 layers, which do not divide into "
                                        "--pipeline-parallel-size 3 equal stages"),
    (["--pipeline-parallel-size", "2", "--virtual-pipeline-parallel-size", "4"],
     "do not divide into --pipeline-parallel-size 2 x --virtual-pipeline-parallel-size 4 equal stages"),
    (["--virtual-pipeline-parallel-size", "2"], "--virtual-pipeline-parallel-size 2 needs --pipeline-parallel-size > 1"),
    (["--pipeline-parallel-size", "2"], "megacore train: --pipeline-parallel-size 2 needs 2 processes: torchrun "
                                        "--nproc-per-node 2"),
])
def test_impossible_pipeline_layouts_are_refused(argv, message, capsys, tmp_path):
    overrides = ["--model-overrides", json.dumps({"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4})]
    assert main(["train", "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), *overrides, *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_interleaving_needs_whole_rounds_of_micro_batches(one_process, tmp_path):
    _, _, caches = one_process
    r = _torchrun(2, caches, tmp_path / "run", "--pipeline-parallel-size", "2", "--virtual-pipeline-parallel-size", "2",
                  "--global-batch-size", "6")
    assert r.returncode != 0
    assert ("needs the micro-batches per step, --global-batch-size 6 / (--micro-batch-size 2 x data-parallel size 1) "
            "= 3, to be a multiple of --pipeline-parallel-size 2") in r.stderr


def test_a_pipeline_run_resumes_in_one_process_like_a_one_process_run(one_process, tmp_path):
    """Saved at PP 2 x V 2 under torchrun, resumed in one process: the next steps' losses are the ones a run
    that was one process throughout takes (its checkpoint and the pipeline's hold the same state)."""
    import shutil

    root, _, caches = one_process
    r = _torchrun(2, caches, tmp_path / "pp", "--pipeline-parallel-size", "2", "--virtual-pipeline-parallel-size", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    shutil.copytree(root / "gpt-tiny", tmp_path / "one")
    for run in ("pp", "one"):
        config = TrainConfig(model="gpt-tiny", cache_dir=caches["gpt-tiny"], output=str(tmp_path / run),
                             **dict(TINY, train_steps=STEPS + 2))
        train(config, log=lambda m: None)
    assert _losses(tmp_path / "pp")[STEPS:] == pytest.approx(_losses(tmp_path / "one")[STEPS:], rel=2e-4)
    assert len(_losses(tmp_path / "pp")) == STEPS + 2
