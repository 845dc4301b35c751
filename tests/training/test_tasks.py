"""megacore.training.tasks: every preset's model declares a registered task; each task's contract on the
embedded corpus and a tiny model (its data, batches of int64 tensors, a loss equal to the model's own,
evaluation's keys, the final report); registering a new task; `megacore evaluate` on a masked-LM and an
ELECTRA checkpoint (the tasks' held-out evaluation)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megacore.models.registry import PRESETS, build
from megacore.training.config import TrainConfig
from megacore.training.tasks import (TASKS, CausalLMTask, ElectraTask, MaskedLMTask, SpanCorruptionTask, Task,
                                     TaskData, register_task)

TINY_MODEL = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
              "hidden_dropout": 0.0, "attention_dropout": 0.0}
SEQ, MICRO, EVAL_BATCHES = 32, 2, 2

# what each task's batch holds (all int64): [b, s] tensors, and [b] ones
BATCH_KEYS = {
    "gpt-tiny": ({"input_ids", "labels"}, set()),
    "bert-tiny": ({"input_ids", "attention_mask", "token_type_ids", "labels"}, {"next_sentence_label"}),
    "roberta-base": ({"input_ids", "attention_mask", "token_type_ids", "labels"}, set()),
    "electra-small": ({"input_ids", "attention_mask", "token_type_ids", "mlm_labels"}, set()),
    "t5-tiny": ({"input_ids", "attention_mask", "labels"}, set()),  # labels: [b, the target length]
}


def test_class_for_preset_of_an_unknown_preset_is_none():
    assert Task.class_for_preset("gpt5") is None


def test_every_preset_declares_a_registered_task_and_gets_it():
    expected = {"gpt-tiny": (CausalLMTask, "gpt"), "gpt2-small": (CausalLMTask, "gpt"),
                "gpt2-medium": (CausalLMTask, "gpt"), "gpt-1.3b": (CausalLMTask, "gpt"),
                "bert-tiny": (MaskedLMTask, "bert"), "bert-base": (MaskedLMTask, "bert"),
                "roberta-base": (MaskedLMTask, "bert"),
                "electra-small": (ElectraTask, "electra"), "electra-base": (ElectraTask, "electra"),
                **{name: (SpanCorruptionTask, "t5") for name in ("t5-tiny", "t5-small", "t5-base", "t5-v1_1-tiny",
                                                                 "t5-v1_1-small", "t5-v1_1-base")}}
    for name in PRESETS:
        task = Task.for_preset(name)
        model = build(name, device="meta")
        assert type(task) is TASKS[model.pretraining_task] is Task.class_for_preset(name), name
        if name in expected:
            assert (type(task), task.family) == expected[name], name


def test_bert_presets_pretrain_with_the_sentence_pairs_of_their_binary_head():
    assert Task.for_preset("bert-tiny").sentence_pairs == "nsp"
    assert Task.for_preset("bert-base").sentence_pairs == "nsp"
    assert Task.for_preset("roberta-base").sentence_pairs is None  # no binary head: packed sentences
    from megacore.models import BertModel
    from megacore.models.registry import preset_config

    sop = BertModel(preset_config("bert-tiny"), head="sop", device="meta")
    assert Task.for_model(sop).sentence_pairs == "sop"


def test_a_model_that_declares_no_registered_task_is_refused_with_the_known_tasks():
    with pytest.raises(ValueError, match=r"Linear declares pretraining_task=None; megacore train knows the tasks "
                                         r"austen-novel, bible-pair, causal_lm, classify, electra, masked_lm, proper-nouns, seq2seq, "
                                             r"span_corruption, translation"):
        Task.for_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        Task.for_preset("gpt5")


def test_a_registered_task_is_what_its_models_train_with(monkeypatch):
    monkeypatch.setattr("megacore.training.tasks.TASKS", dict(TASKS))
    from megacore.training import tasks

    @register_task
    class PermutationLMTask(Task):
        name, family, metric = "permutation_lm", "xlnet", "valid_accuracy"

    class XLNetModel(torch.nn.Module):
        pretraining_task = "permutation_lm"

    assert type(Task.for_model(XLNetModel())) is PermutationLMTask
    assert tasks.TASKS["permutation_lm"] is PermutationLMTask
    with pytest.raises(ValueError, match="task 'permutation_lm' is already registered"):
        register_task(type("Again", (Task,), {"name": "permutation_lm"}))
    with pytest.raises(TypeError, match="expected a Task subclass"):
        register_task(XLNetModel)
    with pytest.raises(ValueError, match="has no name"):
        register_task(type("Nameless", (Task,), {}))


@pytest.fixture(scope="module")
def caches(corpus_cache, wordpiece_corpus_cache, t5_corpus_cache):
    """Cache directories with the embedded corpus prepared (the session's): BPE, WordPiece and T5's Unigram."""
    return {"bpe": corpus_cache, "wordpiece": wordpiece_corpus_cache, "unigram": t5_corpus_cache}


def _config(preset: str, caches) -> TrainConfig:
    cache = caches["bpe" if preset.startswith("gpt") else "unigram" if preset.startswith("t5") else "wordpiece"]
    return TrainConfig(model=preset, cache_dir=cache, output="unused", seq_len=SEQ, vocab_size=1000,
                       micro_batch_size=MICRO, global_batch_size=MICRO, eval_batches=EVAL_BATCHES, progress=False)


def _tiny(preset: str, vocab_size: int):
    torch.manual_seed(0)
    return build(preset, vocab_size=vocab_size, max_position_embeddings=64, **TINY_MODEL)


@pytest.fixture(scope="module", params=sorted(BATCH_KEYS))
def prepared(request, caches):
    """(preset, task, TaskData, a collated training item, a tiny model) for each family (and RoBERTa)."""
    preset = request.param
    task = Task.for_preset(preset)
    data = task.datasets(_config(preset, caches), 1, [6, 4], log=lambda m: None)
    item = next(iter(torch.utils.data.DataLoader(data.train, batch_size=MICRO)))
    return preset, task, data, item, _tiny(preset, data.tokenizer.vocab_size)


def test_datasets_give_the_training_stream_of_the_segments_and_the_validation_samples(prepared):
    _, _, data, _, _ = prepared
    assert isinstance(data, TaskData)
    assert len(data.train) == 6 + 4 and len(data.valid) >= EVAL_BATCHES * MICRO  # GPTDataset: whole epochs
    assert os.path.isabs(data.tokenizer_path) and os.path.isdir(data.tokenizer_path)
    assert len(data.train_indexed) > 0 and data.tokenizer.vocab_size <= 1000


def test_a_batch_is_the_models_keyword_arguments_as_int64_tensors(prepared):
    preset, task, _, item, _ = prepared
    batch = task.batch(item)
    per_token, per_sample = BATCH_KEYS[preset]
    assert set(batch) == per_token | per_sample
    if isinstance(task, SpanCorruptionTask):  # the targets' length follows from the encoder's (T5's rule)
        from megacore.data import span_corruption_lengths

        assert batch.pop("labels").shape == (MICRO, span_corruption_lengths(SEQ)[1])
    for key, value in batch.items():
        assert value.dtype == torch.int64, key
        assert list(value.shape) == ([MICRO, SEQ] if key in per_token else [MICRO]), key


def test_the_loss_is_a_0_dim_fp32_tensor_equal_to_the_models_own_loss(prepared):
    preset, task, _, item, model = prepared
    batch = task.batch(item)
    torch.manual_seed(1)  # ELECTRA's generator samples its replacements
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
    if isinstance(task, CausalLMTask):  # the mean next-token cross-entropy over the counted labels
        logits = model(batch["input_ids"]).float()
        expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    elif isinstance(task, SpanCorruptionTask):  # the mean cross-entropy over the counted targets
        logits = model(batch["input_ids"], decoder_input_ids=model.shift_right(batch["labels"]),
                       attention_mask=batch["attention_mask"]).float()
        expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    elif preset == "bert-tiny":  # masked-LM cross-entropy plus the next-sentence head's
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        expected = (F.cross_entropy(out.mlm.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
                    + F.cross_entropy(out.binary_logits.float(), batch["next_sentence_label"]))
    else:
        torch.manual_seed(1)
        expected = model(**batch).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_evaluate_gives_the_validation_loss_and_the_tasks_metric_and_restores_the_mode(prepared):
    _, task, data, _, model = prepared
    model.train()
    record = task.evaluate(model, data.valid, MICRO, EVAL_BATCHES)
    assert set(record) == {"valid_loss", task.metric} and model.training
    assert math.isfinite(record["valid_loss"]) and record["valid_loss"] > 0
    if task.metric == "valid_perplexity":
        assert record["valid_perplexity"] == pytest.approx(math.exp(record["valid_loss"]))
    else:
        assert 0 <= record[task.metric] <= 1


def test_final_metrics_and_the_report(prepared, caches, tmp_path):
    preset, task, data, _, _ = prepared
    final = task.final_metrics(data, _config(preset, caches))
    result = {"step": 7, "valid_loss": 2.5, task.metric: 0.25, **final, "tokens_per_second": 1234.5,
              "checkpoint": str(tmp_path / "checkpoints" / "step_00000007")}
    lines = task.report(result, tmp_path / "checkpoints")
    if isinstance(task, CausalLMTask):  # the unigram baseline the model must beat
        assert set(final) == {"unigram_perplexity"} and final["unigram_perplexity"] > 1
        assert lines[0] == (f"megacore train: step 7: validation loss 2.500, perplexity 0.2 (a unigram model: "
                            f"{final['unigram_perplexity']:.1f}); 1,234 tokens/s")
        assert f"megacore evaluate --checkpoint {tmp_path / 'checkpoints'}" in lines[1]
    else:
        assert final == {}
        assert lines[0] == (f"megacore train: step 7: validation loss 2.500, {task.metric.replace('_', ' ')} "
                            "0.250; 1,234 tokens/s")
        if isinstance(task, SpanCorruptionTask):  # what to do next with a pretrained T5
            assert f"megacore finetune translation --checkpoint {tmp_path / 'checkpoints'}" in lines[1]
        else:
            assert lines[1].startswith(f"megacore train: checkpoint {result['checkpoint']} (load it with")


@pytest.mark.parametrize("preset", ["bert-tiny", "electra-small", "t5-tiny"])
def test_megacore_evaluate_reads_a_masked_lm_electra_or_t5_checkpoint(preset, caches, tmp_path, capsys):
    from megacore.cli import main
    from megacore.training.run import train

    task = Task.for_preset(preset)
    config = _config(preset, caches)
    overrides = {k: v for k, v in TINY_MODEL.items() if "dropout" not in k}
    train(dataclasses.replace(config, output=str(tmp_path / "run"), train_steps=2, eval_interval=100,
                              save_interval=100, model_overrides=overrides), log=lambda m: None)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"valid_loss", task.metric, "checkpoint"} and 0 <= result[task.metric] <= 1
    assert result["checkpoint"].endswith("step_00000002")
