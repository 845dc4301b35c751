"""`megacore train / evaluate / generate` end to end, in a reduced configuration of the default run (the
embedded corpus, gpt-tiny shrunk), one process and under torchrun with tensor parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megacore.cli import main
from megacore.training.run import TrainConfig, train

SMALL = dict(train_steps=200, seq_len=64, vocab_size=1000, micro_batch_size=4, global_batch_size=8,
             eval_interval=100, eval_batches=4, log_interval=20, save_interval=100, lr=5e-3, min_lr=5e-4,
             warmup_steps=10, progress=False, model_overrides={"num_layers": 2, "hidden_size": 64,
                                                                 "num_attention_heads": 4})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = TrainConfig(cache_dir=str(root / "cache"), output=str(root / "run"), **SMALL)
    return root, train(config, log=lambda m: None)


def test_the_default_run_trains_evaluates_and_checkpoints(trained):
    root, result = trained
    run = root / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    valid = [r["valid_perplexity"] for r in records if "valid_perplexity" in r]
    assert len(valid) == 2 and valid[-1] < valid[0]
    assert result["valid_perplexity"] < result["unigram_perplexity"]
    assert (run / "checkpoints" / "latest").exists() and (run / "train_config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000100", "step_00000200"]


def test_generate_and_evaluate_read_the_checkpoint(trained, capsys):
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints")
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "It is a truth", "--max-new-tokens", "8",
                 "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It is a truth") and len(out) > len("It is a truth\n")
    assert main(["evaluate", "--checkpoint", ckpt, "--passages", "10", "--context-tokens", "32",
                 "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passages"] == 10 and 0 <= result["last_word_accuracy"] <= 1 and result["valid_perplexity"] > 1


def test_rerunning_a_finished_run_resumes_at_its_last_step_and_changes_nothing(trained, tmp_path):
    root, _ = trained
    config = TrainConfig(cache_dir=str(root / "cache"), output=str(root / "run"), **SMALL)
    before = {p.name: p.stat().st_mtime_ns for p in (root / "run" / "checkpoints").iterdir()}
    logs = []
    result = train(config, log=logs.append)
    assert any("resuming from" in line and "at step 200" in line for line in logs)
    assert any("already trained to step 200" in line and "nothing to do" in line for line in logs)
    assert result["already_trained"] and result["step"] == 200
    assert {p.name: p.stat().st_mtime_ns for p in (root / "run" / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "unknown --model 'gpt5'"),
    (["--dtype", "float8"], "--dtype=float8: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    (["--seq-len", "0"], "--seq-len=0: Input should be greater than or equal to 1"),
    (["--tensor-parallel-size", "2"], "megacore train: --tensor-parallel-size 2 needs 2 processes: torchrun --nproc-per-node 2"),
    (["--config", "/nonexistent.json"], "config file /nonexistent.json does not exist"),
])
def test_bad_arguments_give_clear_messages(argv, message, capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("model, metric", [("bert-tiny", "mlm_accuracy"), ("electra-small", "discriminator_accuracy")])
def test_masked_lm_and_electra_pretraining_run_and_report_their_metric(trained, tmp_path, model, metric):
    root, _ = trained
    config = TrainConfig(model=model, cache_dir=str(root / "cache"), output=str(tmp_path / "run"),
                         **dict(SMALL, train_steps=20, eval_interval=10, save_interval=20))
    result = train(config, log=lambda m: None)
    assert 0 <= result[metric] <= 1 and result["valid_loss"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if metric in r] == [10, 20]
    assert (tmp_path / "run" / "checkpoints" / "step_00000020").is_dir()


def test_megacore_train_takes_the_masked_lm_recipe_for_bert_unless_told_otherwise(wordpiece_corpus_cache, tmp_path):
    """bert-tiny trains with MaskedLMTask.defaults (not TrainConfig's GPT recipe); a flag or a --config value
    replaces one of them; a resumed run keeps its checkpoint's values, not the recipe's."""
    from megacore.training.tasks import MaskedLMTask

    common = ["train", "--model", "bert-tiny", "--vocab-size", "1000", "--cache-dir", wordpiece_corpus_cache,
              "--micro-batch-size", "4", "--global-batch-size", "4", "--eval-batches", "1", "--no-progress"]
    saved = lambda run: json.loads((tmp_path / run / "train_config.json").read_text())  # noqa: E731
    assert main([*common, "--output", str(tmp_path / "a"), "--train-steps", "1"]) == 0
    recipe = {k: v for k, v in MaskedLMTask.defaults.items() if k not in ("micro_batch_size", "global_batch_size",
                                                                         "train_steps")}
    assert recipe and {k: saved("a")[k] for k in recipe} == recipe
    assert TrainConfig.seq_len != recipe["seq_len"]  # the recipe is not TrainConfig's
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 3e-4}))
    assert main([*common, "--output", str(tmp_path / "b"), "--train-steps", "1", "--seq-len", "64",
                 "--config", str(config)]) == 0
    assert (saved("b")["seq_len"], saved("b")["lr"], saved("b")["warmup_steps"]) == (64, 3e-4, recipe["warmup_steps"])
    assert main([*common, "--output", str(tmp_path / "b"), "--train-steps", "2"]) == 0  # resume to step 2
    assert (saved("b")["seq_len"], saved("b")["lr"], saved("b")["train_steps"]) == (64, 3e-4, 2)


def test_a_config_file_with_an_unknown_option_is_refused(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_steps": 5, "learning_rate": 1}))
    assert main(["train", "--config", str(path)]) == 1
    assert f"unknown option 'learning_rate' in {path}" in capsys.readouterr().err


def test_torchrun_trains_with_tensor_parallelism(trained, tmp_path):
    root, _ = trained
    config = tmp_path / "c.json"
    config.write_text(json.dumps(dict(SMALL, train_steps=4, eval_interval=100, save_interval=100)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "megacore", "train", "--config", str(config), "--tensor-parallel-size", "2",
                        "--cache-dir", str(root / "cache"), "--output", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation loss" in r.stdout and (tmp_path / "run" / "checkpoints" / "latest").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records if "loss" in rec] == [4]  # rank 0 alone writes the metrics
    assert r.stdout.count("megacore train: gpt-tiny, steps 1-4") == 1  # and the log


def test_an_interrupted_run_resumed_reproduces_the_uninterrupted_losses(trained, tmp_path):
    """Run 40 steps (a checkpoint at 20), then cut the run back to its step-20 checkpoint as a crash would
    and rerun the same command: steps 21-40 repeat the uninterrupted losses bit for bit (same data
    position, RNG, optimizer and schedule state)."""
    import shutil

    root, _ = trained
    out = tmp_path / "run"
    config = dict(SMALL, train_steps=40, eval_interval=100, save_interval=20, log_interval=5)
    train(TrainConfig(cache_dir=str(root / "cache"), output=str(out), **config), log=lambda m: None)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step_00000040")
    (out / "checkpoints" / "latest").write_text("step_00000020")
    (out / "metrics.jsonl").unlink()
    train(TrainConfig(cache_dir=str(root / "cache"), output=str(out), **config), log=lambda m: None)
    second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > 20}  # noqa: E731
    assert losses(second) == losses(first) and len(losses(first)) == 4


def test_the_loss_curve_png_is_written_when_matplotlib_is_installed(trained):
    pytest.importorskip("matplotlib")
    root, _ = trained
    png = root / "run" / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_under_torchrun_is_tensor_parallel_and_equals_one_process(trained, tmp_path):
    root, _ = trained
    ckpt = str(root / "run" / "checkpoints")
    argv = ["-m", "megacore", "generate", "--checkpoint", ckpt, "--prompt", "It is a truth", "--max-new-tokens", "8",
            "--greedy"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *argv], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == one.stdout.strip() and one.stdout.startswith("It is a truth")


def test_tensorboard_events_are_written_when_tensorboard_is_installed(trained):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "valid_perplexity"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")][-1] == SMALL["train_steps"]


def test_a_run_shows_data_evaluate_and_checkpoint_in_torch_profiler(trained, tmp_path):
    """The loop's phases around the trainer's (docs/profiling.md), in a torch.profiler trace of a 2-step run."""
    import torch

    root, _ = trained
    config = dict(SMALL, train_steps=2, eval_interval=100, save_interval=1, log_interval=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(TrainConfig(cache_dir=str(root / "cache"), output=str(tmp_path / "run"), **config), log=lambda m: None)
    names = [e.name for e in sorted(prof.events(), key=lambda e: e.time_range.start)]
    loop = [n for n in names if n in ("megacore.data", "megacore.train_step", "megacore.evaluate",
                                      "megacore.checkpoint")]
    assert loop == ["megacore.data", "megacore.train_step", "megacore.checkpoint", "megacore.data",
                    "megacore.train_step", "megacore.evaluate", "megacore.checkpoint"]
