"""T5 end to end on the embedded corpora: `megacore train --model t5-tiny` (span corruption; resume bit for bit),
`megacore finetune translation` from that checkpoint (BLEU / chrF, greedy and beam search, the copy baseline, test
predictions, resume), `megacore finetune seq2seq` on a user's file from scratch (ROUGE), `megacore generate` on the
fine-tuned checkpoint, and the errors of bad tasks, options and data. Shrunk models and runs: CI-sized."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

pytest.importorskip("sacrebleu")  # dependencies of megacore; a machine that cannot install them (the GPU image) skips
pytest.importorskip("rouge_score")

from megacore.cli import main  # noqa: E402
from megacore.training.run import TrainConfig, train  # noqa: E402

MODEL = {"num_layers": 1, "hidden_size": 64, "kv_channels": 16, "num_attention_heads": 4, "ffn_hidden_size": 128}
PRETRAIN = dict(model="t5-tiny", vocab_size=1000, seq_len=64, micro_batch_size=8, global_batch_size=8, train_steps=40,
                eval_interval=20, eval_batches=2, log_interval=5, save_interval=20, lr=5e-3, min_lr=5e-4,
                warmup_steps=5, progress=False, model_overrides=MODEL)
FINETUNE = ["--train-steps", "30", "--eval-interval", "15", "--save-interval", "15", "--eval-batches", "2",
            "--log-interval", "5", "--micro-batch-size", "16", "--global-batch-size", "16", "--seq-len", "64",
            "--target-length", "64", "--max-new-tokens", "24", "--eval-samples", "8", "--test-samples", "12",
            "--beams", "2", "--no-progress"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, t5_corpus_cache):
    root = tmp_path_factory.mktemp("t5")
    config = TrainConfig(cache_dir=t5_corpus_cache, output=str(root / "pretrain"), **PRETRAIN)
    return root, config, train(config, log=lambda m: None)


def test_span_corruption_pretraining_learns_and_checkpoints(pretrained):
    root, _, result = pretrained
    records = _records(root / "pretrain")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert [r["step"] for r in records if "target_accuracy" in r] == [20, 40]
    assert 0 < result["target_accuracy"] < 1 and result["valid_loss"] > 0
    assert sorted(p.name for p in (root / "pretrain" / "checkpoints").glob("step_*")) == ["step_00000020",
                                                                                         "step_00000040"]


def test_an_interrupted_pretraining_run_resumes_bit_for_bit(pretrained, tmp_path):
    root, config, _ = pretrained
    out = tmp_path / "run"
    shutil.copytree(root / "pretrain", out)
    first = _records(out)
    shutil.rmtree(out / "checkpoints" / "step_00000040")
    (out / "checkpoints" / "latest").write_text("step_00000020")
    (out / "metrics.jsonl").unlink()
    train(dataclasses.replace(config, output=str(out)), log=lambda m: None)
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > 20}  # noqa: E731
    assert losses(_records(out)) == losses(first) and len(losses(first)) == 4


@pytest.fixture(scope="module")
def finetuned(pretrained):
    root, _, _ = pretrained
    run = root / "translation"
    argv = ["finetune", "translation", "--checkpoint", str(root / "pretrain" / "checkpoints"), "--output", str(run),
            *FINETUNE]
    assert main(argv) == 0
    return root, run, argv


def test_translation_finetuning_reports_bleu_chrf_beam_search_and_the_copy_baseline(finetuned, capsys):
    _, run, _ = finetuned
    records = _records(run)
    assert [r["step"] for r in records if "valid_bleu" in r] == [15, 30]
    final = {k: v for r in records for k, v in r.items()}
    for key in ("test_bleu", "test_chrf", "test_beam2_bleu", "test_beam2_chrf", "copy_bleu", "copy_chrf",
                "valid_bleu", "valid_chrf", "target_accuracy"):
        assert 0 <= final[key] <= 100, key
    assert final["test_pairs"] == 12 and final["copy_chrf"] > 10  # names, numbers and punctuation carry over
    predictions = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 12 and set(predictions[0]) == {"source", "reference", "greedy", "beam"}
    assert predictions[0]["source"].startswith("Y ACONTECIÓ en los días de Assuero")  # Esther 1:1, held out
    config = json.loads((run / "train_config.json").read_text())
    assert config["task"] == "translation" and config["pretrained"].endswith("checkpoints")
    assert config["model"] == "t5-tiny" and config["task_options"]["beams"] == 2


def test_a_finetuned_checkpoint_translates_with_generate(finetuned, capsys):
    _, run, _ = finetuned
    argv = ["generate", "--checkpoint", str(run / "checkpoints"), "--prompt", "Y dijo Dios: Sea la luz.",
            "--max-new-tokens", "12"]
    assert main(argv) == 0
    greedy = capsys.readouterr().out
    assert greedy.count("\n") == 1  # one line (a 30-step model may well say nothing yet)
    # the same as the run's own decoding of that source (with its prefix)
    from megacore.training.run import model_from_checkpoint
    from megacore.training.seq2seq import translate

    model, tokenizer, _ = model_from_checkpoint(str(run / "checkpoints"))
    expected = translate(model, tokenizer, ["translate Spanish to English: Y dijo Dios: Sea la luz."],
                         max_new_tokens=12)
    assert greedy.strip() == expected[0]
    assert main(argv + ["--beams", "3", "--length-penalty", "0.6"]) == 0
    beam = translate(model, tokenizer, ["translate Spanish to English: Y dijo Dios: Sea la luz."], max_new_tokens=12,
                     num_beams=3, length_penalty=0.6)
    assert capsys.readouterr().out == beam[0] + "\n"


def test_an_interrupted_finetuning_run_resumes_bit_for_bit(finetuned, tmp_path):
    _, run, argv = finetuned
    out = tmp_path / "run"
    shutil.copytree(run, out)
    first = _records(out)
    shutil.rmtree(out / "checkpoints" / "step_00000030")
    (out / "checkpoints" / "latest").write_text("step_00000015")
    (out / "metrics.jsonl").unlink()
    assert main([*argv[:argv.index("--output")], "--output", str(out), *FINETUNE]) == 0
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > 15}  # noqa: E731
    assert losses(_records(out)) == losses(first) and len(losses(first)) == 3


def test_seq2seq_finetuning_on_a_users_file_from_scratch_reports_rouge(tmp_path, capsys):
    from megacore.data import bible_pairs

    def write(name, pairs):
        (tmp_path / name).write_text("".join(json.dumps({"article": p.en, "headline": " ".join(p.en.split()[:4])})
                                             + "\n" for p in pairs))

    write("train.jsonl", bible_pairs("train")[:400])
    write("valid.jsonl", bible_pairs("valid")[:10])
    argv = ["finetune", "seq2seq", "--model", "t5-tiny", "--model-overrides", json.dumps(MODEL), "--vocab-size", "300",
            "--train", str(tmp_path / "train.jsonl"), "--valid", str(tmp_path / "valid.jsonl"),
            "--source-key", "article", "--target-key", "headline", "--output", str(tmp_path / "run"),
            "--train-steps", "6", "--eval-interval", "100", "--save-interval", "100", "--eval-batches", "1",
            "--micro-batch-size", "8", "--global-batch-size", "8", "--seq-len", "64", "--target-length", "16",
            "--beams", "1", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ROUGE-1/2/L" in out and "copying the source" not in out
    final = {k: v for r in _records(tmp_path / "run") for k, v in r.items()}
    assert {"test_rouge1", "test_rouge2", "test_rougeL", "test_bleu", "test_chrf"} <= set(final)
    assert final["test_pairs"] == 10 and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["translation", "--direction", "fr-en"], "task option direction='fr-en' must be one of es-en, en-es"),
    (["translation", "--beams", "0"], "task option beams=0 must be an int >= 1"),
    (["seq2seq"], "task seq2seq needs its data: --train FILE and --valid FILE"),
    (["translation", "--model", "gpt-tiny"], "task 'translation' cannot train a GPTModel (an encoder-decoder"),
    (["translation", "--config", "CONFIG"], "task 'translation' has no option 'beam_size'"),
    (["translation", "--checkpoint", "/nonexistent"], "/nonexistent"),
])
def test_bad_tasks_and_options_give_one_clear_line(argv, message, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"task_options": {"beam_size": 4}}))
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    assert main(["finetune", *argv, "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and err.count("\n") == 1, err


def test_bad_seq2seq_data_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n')
    argv = ["finetune", "seq2seq", "--train", str(tmp_path / "t.jsonl"), "--valid", str(tmp_path / "t.jsonl"),
            "--output", str(tmp_path / "r")]
    assert main(argv) == 1
    assert f"{tmp_path / 't.jsonl'}:2: no field 'target'" in capsys.readouterr().err


def test_generate_under_torchrun_is_tensor_parallel_and_translates_like_one_process(finetuned):
    import os
    import subprocess
    import sys

    _, run, _ = finetuned
    argv = ["-m", "megacore", "generate", "--checkpoint", str(run / "checkpoints"), "--prompt",
            "Y dijo Dios: Sea la luz.", "--max-new-tokens", "12", "--beams", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *argv], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.count("\n") == 1


def test_a_short_translation_run_from_scratch_beats_copying_the_source(tmp_path, capsys):
    """The issue's bar, at test size: 400 steps of t5-tiny from scratch (~1 min on 2 Xeon cores in bf16, ~3 min on
    2 AMD EPYC cores without native bf16, so in fp32) translate the held-out books better than copying the Spanish
    source does: BLEU 0.57 (Xeon) and 0.35 (EPYC) against copying's 0.11 (chrF needs the full default run, see the
    README). Twice copying's BLEU: 3x held on the Xeon, not by much on the EPYC (3.2x)."""
    argv = ["finetune", "translation", "--output", str(tmp_path / "run"), "--vocab-size", "2000", "--train-steps",
            "400", "--eval-interval", "1000", "--save-interval", "1000", "--eval-batches", "2", "--eval-samples", "20",
            "--test-samples", "200", "--beams", "1", "--seq-len", "96", "--target-length", "96", "--max-new-tokens",
            "64", "--log-interval", "100", "--no-progress"]
    assert main(argv) == 0
    final = {k: v for r in _records(tmp_path / "run") for k, v in r.items()}
    assert final["test_bleu"] > 2 * final["copy_bleu"] > 0, final
