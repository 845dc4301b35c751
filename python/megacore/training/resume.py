"""Reading back what ``megacore train`` saves: the point a run resumes from, a model rebuilt from a checkpoint
(``megacore generate``) and a checkpoint evaluated on the held-out novel (``megacore evaluate``).

A checkpoint's ``extra`` holds what :func:`model_from_checkpoint` needs to rebuild the model (``preset``,
``model_config``) and the tokenizer (copied into the checkpoint as ``TOKENIZER_DIR``), and what a resumed run
continues with (``train_config``, ``step``, ``consumed_samples``, ``data_segments``, ``schedule``, ``scaler``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from megacore.training.config import TrainConfig, resume_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_DIR = "tokenizer"  # the tokenizer's copy inside every checkpoint written by megacore train


def _read_extra(step_dir: str, fn: str) -> dict:
    from megacore.training.checkpoint import EXTRA_NAME

    path = os.path.join(step_dir, EXTRA_NAME)
    extra = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    if "model_config" not in extra:
        raise ValueError(f"megacore {fn}: {step_dir} was not written by `megacore train` (no model_config in its "
                         "extra)")
    # The tokenizer travels with the checkpoint (older checkpoints recorded an absolute path).
    copied = os.path.join(step_dir, TOKENIZER_DIR)
    extra["tokenizer"] = copied if os.path.exists(copied) else extra.get("tokenizer")
    if not extra["tokenizer"] or not os.path.exists(extra["tokenizer"]):
        raise FileNotFoundError(f"megacore {fn}: {step_dir} has no {TOKENIZER_DIR}/ and its recorded tokenizer "
                                f"{extra['tokenizer']} does not exist")
    return extra


def resume_point(ckpt_root: Path, config: TrainConfig, explicit: Optional[set], log, auto=None):
    """(config, step, extra or None, step directory or None) of a run: the newest complete checkpoint under
    ``ckpt_root`` and the configuration it continues with (see config.resume_config; ``auto`` is what
    ``--dtype auto`` resolves to here), or step 0."""
    from megacore.training.checkpoint import latest_mismatch, newest_checkpoint

    step_dir = newest_checkpoint(ckpt_root)
    if step_dir is None:
        return config, 0, None, None
    extra = _read_extra(step_dir, "train")
    step = int(extra["step"])
    saved = extra.get("train_config")
    if saved is None:  # written before checkpoints carried their configuration
        path = ckpt_root.parent / "train_config.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
    config, notes = resume_config(saved, config, explicit, step, auto)
    mismatch = latest_mismatch(ckpt_root)
    log(f"megacore train: resuming from {step_dir} at step {step} (the newest complete checkpoint"
        + (f"; {mismatch})" if mismatch else ")"))
    for note in notes:
        log(f"megacore train: resume: {note}")
    return config, step, extra, step_dir


def data_segments(extra: Optional[dict], config: TrainConfig, step: int) -> tuple[int, list[int]]:
    """(consumed samples, training-stream segments) of a run at ``step`` (``extra``: the checkpoint's, None
    for a new run): the data position in samples, exact across resumes whatever the batch size was, and the
    segments of ``training_stream`` with one appended when the remaining steps need more samples."""
    consumed = int(extra.get("consumed_samples", step * config.global_batch_size)) if extra else 0
    segments = [int(n) for n in extra.get("data_segments", [])] if extra else []
    if not segments and extra:  # checkpoints before data segments: the run's original size
        saved = extra.get("train_config") or {}
        segments = [int(saved.get("train_steps", config.train_steps)) * int(saved.get("global_batch_size",
                                                                                   config.global_batch_size))]
    needed = consumed + (config.train_steps - step) * config.global_batch_size
    if sum(segments) < needed:
        segments.append(needed - sum(segments))
    return consumed, segments


def restore_training_state(step_dir: str, config: TrainConfig, model, optimizer, schedule, scaler) -> None:
    """Loads a resumed run's weights, optimizer, RNG, schedule and loss-scaler state from ``step_dir``; the
    schedule is stretched to ``config.train_steps``, and with ``config.override_lr_schedule`` takes the
    config's rates, warmup and weight decay instead of the checkpoint's."""
    from megacore.training.checkpoint import load_checkpoint

    extra = load_checkpoint(step_dir, model, optimizer)
    schedule.load_state_dict(extra["schedule"])
    if schedule.total_steps != config.train_steps:
        schedule.reshape(total_steps=config.train_steps,
                         warmup_steps=min(schedule.warmup_steps, config.train_steps))
    if config.override_lr_schedule:
        schedule.reshape(max_lr=config.lr, min_lr=config.min_lr,
                         warmup_steps=min(config.warmup_steps, config.train_steps))
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0) > 0:
                group["weight_decay"] = config.weight_decay
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])


def family_of_checkpoint(extra: dict) -> str:
    """"gpt", "bert" or "electra" (its task's ``family``): the family of the preset a checkpoint was trained as."""
    from megacore.training.tasks import Task

    return Task.for_preset(extra["preset"]).family


def model_class_name(model) -> Optional[str]:
    """The name under which a checkpoint records ``model``'s class when it is not its preset's
    (``megacore.models.registry.MODEL_CLASSES``: a fine-tuning task's Classifier), else None."""
    from megacore.models.registry import MODEL_CLASSES

    return next((name for name, cls in MODEL_CLASSES.items() if type(model) is cls), None)


def model_class_of(extra: dict):
    """The model class a checkpoint's ``extra`` was saved from: ``extra["model_class"]`` (MODEL_CLASSES) when
    recorded, else its preset's. Raises ValueError for a name this megacore does not know."""
    from megacore.models.registry import MODEL_CLASSES, PRESETS

    name = extra.get("model_class")
    if name is not None:
        if name not in MODEL_CLASSES:
            raise ValueError(f"megacore: the checkpoint's model class {name!r} is not known here; known: "
                             f"{', '.join(sorted(MODEL_CLASSES))}")
        return MODEL_CLASSES[name]
    if extra.get("preset") not in PRESETS:
        raise ValueError(f"megacore: the checkpoint's preset {extra.get('preset')!r} is not known here")
    return PRESETS[extra["preset"]][0]


def model_from_checkpoint(checkpoint: str, device=None):
    """(model in eval mode with the checkpoint's weights, tokenizer, the checkpoint's extra) for a checkpoint
    written by ``megacore train`` (a step directory, or the checkpoints root: its newest complete step).
    ``extra["tokenizer"]`` is the path of the tokenizer copy inside the checkpoint; ``extra["path"]`` the
    step directory."""
    from megacore.data import Tokenizer
    from megacore.models import ModelConfig
    from megacore.parallel import state
    from megacore.training.checkpoint import load_checkpoint, resolve_checkpoint

    step_dir = resolve_checkpoint(checkpoint, "model_from_checkpoint")
    extra = _read_extra(step_dir, "model_from_checkpoint")
    fields = dict(extra["model_config"])
    fields["params_dtype"] = DTYPES[fields["params_dtype"]]
    fields["tensor_parallel"] = state.model_parallel_is_initialized() and state.get_tensor_parallel_world_size() > 1
    fields["sequence_parallel"] = False
    model_cls = model_class_of(extra)
    model = model_cls(getattr(model_cls, "config_class", ModelConfig)(**fields), device=device)
    load_checkpoint(step_dir, model, restore_rng=False)
    extra["path"] = step_dir
    return model.eval(), Tokenizer.load(extra["tokenizer"]), extra


def evaluate_checkpoint(checkpoint: str, batches: int = 50, passages: int = 200, context_tokens: int = 128) -> dict:
    """``megacore evaluate``: a checkpoint of ``megacore train`` on the embedded corpus's held-out novel
    (Persuasion), tokenized with the checkpoint's own tokenizer and cut as its task's ``corpus_units`` say,
    over ``batches`` batches of 8 sequences (``Task.evaluate_held_out``). Causal LMs: perplexity and the
    LAMBADA-style accuracy of greedily predicting each of ``passages`` passages' last word; masked LMs
    (BERT/RoBERTa): validation loss and MLM accuracy; ELECTRA: validation loss and the discriminator's
    accuracy. Returns the metrics with ``"checkpoint"`` (the step directory)."""
    from megacore.data.prepare import prepare_dataset
    from megacore.training.tasks import Task

    model, tokenizer, extra = model_from_checkpoint(checkpoint)
    task = Task.for_model(model)
    saved = extra.get("train_config") or {}
    seq = int(saved.get("seq_len", min(int(extra["model_config"]["max_position_embeddings"]), 256)))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/valid"
        prepare_dataset(None, prefix, tokenizer=extra["tokenizer"], split="valid", progress=False,
                        log=lambda m: None, **task.corpus_units)
        dataset = task.evaluation_dataset(prefix, tokenizer, seq, batches * 8)
        result = task.evaluate_held_out(model, tokenizer, dataset, 8, batches, passages, context_tokens)
    return {**result, "checkpoint": extra["path"]}


__all__ = ["DTYPES", "TOKENIZER_DIR", "data_segments", "evaluate_checkpoint", "family_of_checkpoint",
           "model_from_checkpoint", "restore_training_state", "resume_point"]
