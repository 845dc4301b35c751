"""Fine-tuning classifiers end to end: `megacore finetune austen-novel | proper-nouns | classify` from a
`megacore train` checkpoint, from scratch and from a Hugging Face directory; resume bit for bit; `megacore evaluate
--task`, `megacore predict`; layer-wise learning-rate decay and the linear schedule; tensor x data parallelism under
torchrun equal to one process; the errors of bad data and options. Shrunk models and runs: CI-sized (bible-pair's
data is tests/data/test_classification_data.py's; its runs are the README's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megacore.cli import main
from megacore.training.run import TrainConfig, train

ENCODER = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "ffn_hidden_size": 128}
PRETRAIN = dict(model="bert-tiny", vocab_size=1000, seq_len=64, micro_batch_size=16, global_batch_size=16,
                train_steps=60, eval_interval=60, eval_batches=2, log_interval=10, save_interval=60, lr=5e-3,
                min_lr=5e-4, warmup_steps=5, progress=False, model_overrides=ENCODER)
FINETUNE = ["--train-steps", "40", "--eval-interval", "20", "--save-interval", "20", "--log-interval", "10",
            "--micro-batch-size", "16", "--global-batch-size", "16", "--seq-len", "64", "--eval-samples", "96",
            "--test-samples", "128", "--lr", "2e-3", "--warmup-steps", "4", "--no-progress"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run) -> dict:
    return {k: v for r in _records(run) for k, v in r.items()}


# ---- the optimizer: layer-wise decay, the linear schedule ------------------------------------------------------


def test_layer_lr_scales_follow_electras_recipe():
    """google-research/electra model/optimization.py `_get_layer_lrs`: depth 0 for the embeddings and their
    projection, i + 1 for layer i, n_layers + 2 for the task's head; rate x decay ** (n_layers + 2 - depth)."""
    from megacore.training.optim import layer_lr_scales

    names = ["embedding.word.weight", "discriminator.projection.weight", "discriminator.encoder.layers.0.mlp.fc1.weight",
             "discriminator.encoder.layers.2.attention.qkv.bias", "classifier.out_proj.weight", "pooler.dense.bias"]
    scales = layer_lr_scales(names, 0.8)
    assert scales == pytest.approx({names[0]: 0.8 ** 5, names[1]: 0.8 ** 5, names[2]: 0.8 ** 4, names[3]: 0.8 ** 2,
                                    names[4]: 1.0, names[5]: 1.0})
    assert set(layer_lr_scales(names, 1.0).values()) == {1.0}
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="layer_lr_decay"):
            layer_lr_scales(names, bad)


def test_layer_wise_decay_groups_and_the_linear_schedule_set_each_groups_rate():
    from megacore.models.registry import build
    from megacore.training import LRSchedule, build_optimizer

    model = build("bert-tiny", **ENCODER, vocab_size=100)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5)
    schedule = LRSchedule(optimizer, max_lr=1e-3, min_lr=0.0, warmup_steps=2, total_steps=10, decay="linear")
    for _ in range(6):
        schedule.step()
    rate = 1e-3 * (1 - 4 / 8)  # step 6: 4 of the 8 decay steps done
    rates = {name: g["lr"] for g in optimizer.param_groups for name in g["names"]}
    # two layers: the head at depth 4, layer 1 at 2, layer 0 at 1, the embeddings at 0 (ELECTRA leaves depth 3 empty)
    assert rates["encoder.layers.1.mlp.fc1.weight"] == pytest.approx(rate * 0.5 ** 2)
    assert rates["encoder.layers.0.mlp.fc1.weight"] == pytest.approx(rate * 0.5 ** 3)
    assert rates["embedding.word.weight"] == pytest.approx(rate * 0.5 ** 4)
    assert rates["mlm_head.dense.weight"] == pytest.approx(rate)
    decays = {name: g["weight_decay"] for g in optimizer.param_groups for name in g["names"]}
    assert decays["encoder.layers.0.mlp.fc1.weight"] == 0.01 and decays["encoder.layers.0.mlp.fc1.bias"] == 0.0


# ---- runs ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, wordpiece_corpus_cache):
    root = tmp_path_factory.mktemp("classify")
    config = TrainConfig(cache_dir=wordpiece_corpus_cache, output=str(root / "pretrain"), **PRETRAIN)
    train(config, log=lambda m: None)
    return root


@pytest.fixture(scope="module")
def novel_run(pretrained, wordpiece_corpus_cache):
    run = pretrained / "austen-novel"
    argv = ["finetune", "austen-novel", "--checkpoint", str(pretrained / "pretrain" / "checkpoints"), "--output",
            str(run), "--cache-dir", wordpiece_corpus_cache, "--layer-lr-decay", "0.8", *FINETUNE]
    assert main(argv) == 0
    return run, argv


def test_austen_novel_fine_tuning_reports_accuracy_macro_f1_and_the_majority_baseline(novel_run, capsys):
    run, _ = novel_run
    records = _records(run)
    assert [r["step"] for r in records if "valid_accuracy" in r] == [20, 40]
    final = _final(run)
    for key in ("valid_loss", "valid_accuracy", "valid_macro_f1", "test_accuracy", "test_macro_f1", "test_loss",
                "majority_accuracy", "majority_macro_f1"):
        assert 0 <= final[key] < 100, (key, final)
    assert "test_mcc" not in final  # six classes
    assert final["test_examples"] == 128
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], losses
    predictions = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 128 and {"text", "label", "prediction", "probability"} <= set(predictions[0])
    extra = torch.load(run / "checkpoints" / "step_00000040" / "extra.pt", weights_only=True)
    assert extra["model_class"] == "classifier" and len(extra["model_config"]["label_names"]) == 6


GPT = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 2}


def test_a_pretrained_checkpoint_fine_tunes_better_than_new_weights(tmp_path, corpus_cache):
    """The issue's bar at CI size: 400 steps of causal-LM pretraining on the novels, then 200 steps of
    austen-novel fine-tuning reach 0.41 test accuracy, the same 200 steps from new weights 0.22 (chance 1/6; 300
    held-out passages; 2-core AMD EPYC; with a 2,000-token BPE: 0.53 against 0.38). GPT, because a masked LM needs
    thousands of steps to leave the unigram plateau (docs/finetuning.md); fp32 on every machine; a learning rate
    for a short run (3e-3, no layer-wise decay: at the defaults' 1e-3 and 0.8, 150 steps gave 0.28 against 0.27)."""
    pretrain = TrainConfig(model="gpt-tiny", model_overrides=GPT, vocab_size=1000, cache_dir=corpus_cache,
                           output=str(tmp_path / "pretrain"), train_steps=400, eval_interval=400, eval_batches=4,
                           save_interval=400, log_interval=100, dtype="float32", progress=False)
    train(pretrain, log=lambda m: None)
    assert _final(tmp_path / "pretrain")["valid_loss"] < 5.0  # perplexity < 150
    common = ["--cache-dir", corpus_cache, "--dtype", "float32", "--train-steps", "200", "--eval-interval", "200",
              "--save-interval", "200", "--log-interval", "100", "--micro-batch-size", "16", "--global-batch-size",
              "16", "--seq-len", "128", "--eval-samples", "96", "--test-samples", "300", "--lr", "3e-3",
              "--warmup-steps", "10", "--layer-lr-decay", "1.0", "--no-progress"]
    starts = {"pretrained": ["--checkpoint", str(tmp_path / "pretrain" / "checkpoints")],
              "new": ["--model", "gpt-tiny", "--model-overrides", json.dumps(GPT), "--vocab-size", "1000"]}
    accuracy = {}
    for name, start in starts.items():
        assert main(["finetune", "austen-novel", *start, "--output", str(tmp_path / name), *common]) == 0
        accuracy[name] = _final(tmp_path / name)["test_accuracy"]
    assert accuracy["pretrained"] > 0.3 and accuracy["pretrained"] > accuracy["new"] + 0.08, accuracy


def test_evaluate_and_predict_on_the_fine_tuned_checkpoint(novel_run, capsys):
    run, _ = novel_run
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = _final(run)
    assert result["task"] == "austen-novel" and result["examples"] == 128
    assert result["accuracy"] == pytest.approx(final["test_accuracy"])
    assert result["macro_f1"] == pytest.approx(final["test_macro_f1"])
    assert main(["predict", "--checkpoint", str(run / "checkpoints"), "--text",
                 "Mr. Darcy looked at Elizabeth.", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    probabilities = [float(line.split("\t")[1]) for line in lines]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_an_interrupted_fine_tuning_run_resumes_bit_for_bit(novel_run, tmp_path):
    run, argv = novel_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    first = _records(out)
    shutil.rmtree(out / "checkpoints" / "step_00000040")
    (out / "checkpoints" / "latest").write_text("step_00000020")
    (out / "metrics.jsonl").unlink()
    assert main([*argv[:argv.index("--output") + 1], str(out), *argv[argv.index("--output") + 2:]]) == 0
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > 20}  # noqa: E731
    assert losses(_records(out)) == losses(first) and len(losses(first)) == 2
    assert _final(out)["test_accuracy"] == _final(run)["test_accuracy"]


def test_proper_noun_tagging_reports_word_level_metrics_and_predicts_a_tag_per_word(pretrained, capsys,
                                                                                   wordpiece_corpus_cache):
    """Token classification end to end (whether it learns names is measured at the default size: the README)."""
    run = pretrained / "proper-nouns"
    argv = ["finetune", "proper-nouns", "--checkpoint", str(pretrained / "pretrain" / "checkpoints"), "--output",
            str(run), "--cache-dir", wordpiece_corpus_cache, *FINETUNE]
    argv[argv.index("--train-steps") + 1] = "10"
    assert main(argv) == 0
    final = _final(run)
    # word-level: the counted tokens are the words' first pieces; the majority tag is O, most words
    assert final["majority_accuracy"] > 0.9 and 0 <= final["test_macro_f1"] <= 1 and "test_mcc" in final
    record = json.loads((run / "test_predictions.jsonl").read_text().splitlines()[0])
    assert len(record["words"]) == len(record["labels"]) == len(record["predictions"])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run / "checkpoints"), "--text", "Emma walked to Highbury ."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["Emma", "walked", "to", "Highbury", "."]
    assert {line.split("\t")[1] for line in lines} <= {"NAME", "O"}


def _write_rows(path, rows, kind):
    import csv

    with open(path, "w", newline="") as f:
        if kind == "jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's sentiment-like task: texts with "good" / "bad" words, labels "pos" / "neg"."""
    root = tmp_path_factory.mktemp("user")
    words = {"pos": ["good", "fine", "happy", "kind"], "neg": ["bad", "poor", "sad", "cruel"]}
    rows = [{"text": f"it was a {words[label][i % 4]} day in town number {i}", "label": label}
            for i in range(160) for label in ("pos", "neg")]
    _write_rows(root / "train.csv", rows[:256], "csv")
    _write_rows(root / "valid.jsonl", rows[256:], "jsonl")
    return root


def test_classify_on_users_files_from_a_pretrained_checkpoint(pretrained, user_files, tmp_path, capsys):
    run = tmp_path / "user"
    argv = ["finetune", "classify", "--train", str(user_files / "train.csv"), "--valid", str(user_files / "valid.jsonl"),
            "--checkpoint", str(pretrained / "pretrain" / "checkpoints"), "--output", str(run), *FINETUNE]
    argv[argv.index("--lr") + 1] = "5e-3"
    argv[argv.index("--train-steps") + 1] = "100"
    argv += ["--dtype", "float32"]  # the same numbers on every CPU (auto is bf16 on some)
    assert main(argv) == 0
    final = _final(run)
    assert final["test_accuracy"] > 0.8 and "test_mcc" in final, final  # chance: 0.5
    # an evaluation file with a label the model never saw names the example
    (tmp_path / "new.jsonl").write_text('{"text": "a good day", "label": "pos"}\n{"text": "meh", "label": "neutral"}\n')
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints"), "--file", str(tmp_path / "new.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "neutral" in err and f"{tmp_path / 'new.jsonl'}:2" in err, err


@pytest.mark.parametrize("argv, message", [
    (["classify", "--train", "BAD", "--valid", "BAD"], "BAD:3"),
    (["classify", "--train", "LONG", "--valid", "LONG", "--seq-len", "16"], "LONG:2"),
    (["proper-nouns", "--model", "gpt-tiny"], "cannot train a GPTModel"),
    (["austen-novel", "--pipeline-parallel-size", "2"], "pipeline"),
    (["austen-novel", "--layer-lr-decay", "1.5"], "--layer-lr-decay"),
    (["austen-novel", "--hf", "NOWHERE"], "NOWHERE"),
])
def test_bad_data_and_options_are_one_line_errors(argv, message, tmp_path, capsys, wordpiece_corpus_cache):
    (tmp_path / "bad.csv").write_text("text,label\nfine day,pos\nno label here\n")
    (tmp_path / "long.csv").write_text("text,label\n" + "word " * 40 + ",pos\n")
    paths = {"BAD": str(tmp_path / "bad.csv"), "LONG": str(tmp_path / "long.csv"), "NOWHERE": str(tmp_path / "nowhere")}
    argv = [paths.get(a, a) for a in argv]
    message = message.replace("BAD", paths["BAD"]).replace("LONG", paths["LONG"]).replace("NOWHERE", paths["NOWHERE"])
    capsys.readouterr()
    assert main(["finetune", *argv, "--output", str(tmp_path / "r"), "--cache-dir", wordpiece_corpus_cache,
                 "--vocab-size", "1000", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


def test_fine_tuning_a_hugging_face_directory(tmp_path, wordpiece_corpus_cache):
    """--hf DIR: a BertForPreTraining saved by transformers (with a tokenizer.json) fine-tunes; its checkpoint's
    classifier goes back to transformers as a BertForSequenceClassification with the same logits."""
    transformers = pytest.importorskip("transformers")
    from megacore.data import Tokenizer
    from megacore.interop.hf import to_hf
    from megacore.training.run import model_from_checkpoint

    tokenizer = Tokenizer.load(os.path.join(wordpiece_corpus_cache, "austen-wordpiece1000-paragraph-sentences",
                                            "train.tokenizer"))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=128)
    hf_dir = tmp_path / "hf"
    transformers.BertForPreTraining(config).save_pretrained(hf_dir)
    tokenizer.backend.save(str(hf_dir / "tokenizer.json"))
    run = tmp_path / "run"
    argv = ["finetune", "austen-novel", "--hf", str(hf_dir), "--output", str(run), "--dtype", "float32", *FINETUNE]
    argv[argv.index("--train-steps") + 1] = "10"
    assert main(argv) == 0
    model, _, _ = model_from_checkpoint(str(run / "checkpoints"))
    hf = to_hf(model).eval()
    assert type(hf).__name__ == "BertForSequenceClassification" and len(hf.config.id2label) == 6
    ids = torch.randint(5, tokenizer.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                               model(ids, attention_mask=mask).logits, atol=1e-4, rtol=1e-4)


def test_tensor_and_data_parallel_fine_tuning_under_torchrun_equals_one_process(pretrained, tmp_path):
    """torchrun, 4 processes: tensor-parallel 2 x data-parallel 2 trains the same losses and reaches the same test
    metrics as one process (gloo, fp32)."""
    ckpt = str(pretrained / "pretrain" / "checkpoints")
    common = ["-m", "megacore", "finetune", "austen-novel", "--checkpoint", ckpt, "--dtype", "float32",
              "--distributed-timeout-minutes", "2", *FINETUNE]
    common[common.index("--train-steps") + 1] = "10"
    common[common.index("--micro-batch-size") + 1] = "8"  # one process accumulates 2 micro-batches, DP 2 one each
    common[common.index("--test-samples") + 1] = "48"
    common[common.index("--eval-samples") + 1] = "48"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    four = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           *common, "--tensor-parallel-size", "2", "--output", str(tmp_path / "four")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert four.returncode == 0, four.stderr[-3000:]
    a, b = _final(tmp_path / "one"), _final(tmp_path / "four")
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1 / 48 + 1e-9)
