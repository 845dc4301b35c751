"""The training pieces together: Trainer + MixedPrecision + LRSchedule + checkpoints. Resuming from a
checkpoint reproduces the uninterrupted run's losses bit for bit on CPU, in fp32 and in bf16 with fp32
master weights."""

import pytest
import torch

from megacore.models import GPTModel, ModelConfig
from megacore.training import (
    LRSchedule,
    MixedPrecision,
    Trainer,
    build_optimizer,
    load_checkpoint,
    save_checkpoint,
)


def _setup(dtype):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4,
                                 max_position_embeddings=16, hidden_dropout=0.1, attention_dropout=0.1))
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision, lr=3e-3)
    schedule = LRSchedule(optimizer, max_lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=10)
    return model, precision, optimizer, schedule, Trainer(model, optimizer, schedule, precision=precision,
                                                          grad_accumulation=2)


def _batches(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 61, (2, 2, 16), generator=g)
    return [{"input_ids": b, "labels": torch.roll(b, -1, 1)} for b in ids]


def _run(trainer, steps):
    return [trainer.train_step(_batches(s))["loss"] for s in steps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_resume_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path, dtype):
    *_, trainer = _setup(dtype)
    uninterrupted = _run(trainer, range(6))

    model, precision, optimizer, schedule, trainer = _setup(dtype)
    first = _run(trainer, range(3))
    save_checkpoint(tmp_path, 3, model, optimizer, extra={"schedule": schedule.state_dict()})
    model, precision, optimizer, schedule, trainer = _setup(dtype)
    torch.manual_seed(999)  # the checkpoint's RNG state must win
    extra = load_checkpoint(tmp_path, model, optimizer)
    schedule.load_state_dict(extra["schedule"])
    resumed = _run(trainer, range(3, 6))
    assert first + resumed == uninterrupted
