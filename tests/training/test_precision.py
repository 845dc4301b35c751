"""Mixed precision: fp32 master weights for bf16/fp16 models, and dynamic loss scaling (overflow steps skipped
and counted without touching the weights, the scale halved on overflow and grown after a clean window). The
training tests run on every device present (the ``device`` fixture; float16 is emulated on CPUs but runs)."""

import math

import pytest
import torch

from megacore.training import DynamicLossScaler, LRSchedule, MixedPrecision, Trainer, build_optimizer
from tests.training.test_optim import tiny_gpt


def _batch(seed=0, device="cpu"):
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "labels": torch.roll(ids, -1, 1).to(device)}


def _trainer(dtype, lr=1e-3, scaler=None, device="cpu", **kw):
    """(a Trainer of a one-layer GPT built on the CPU from seed 0 and moved to ``device`` before MixedPrecision
    makes its fp32 masters, so that they are made there too; the model's fp32 weights before the cast)."""
    torch.manual_seed(0)
    model = tiny_gpt(num_layers=1).to(device)
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision, lr=lr)
    schedule = LRSchedule(optimizer, max_lr=lr, total_steps=100, decay="constant")
    return Trainer(model, optimizer, schedule, precision=precision, scaler=scaler, **kw), fp32


def test_fp32_mixed_precision_is_a_no_op():
    model = tiny_gpt(num_layers=1)
    precision = MixedPrecision(model, torch.float32)
    assert not precision.enabled
    assert [id(p) for p in precision.parameters()] == [id(p) for p in model.parameters()]
    assert precision.state_dict() == {}


def test_bf16_keeps_fp32_master_weights_that_accumulate_small_updates(device):
    trainer, fp32 = _trainer(torch.bfloat16, lr=1e-6, device=device)
    precision, model = trainer.precision, trainer.model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    masters = dict(precision.named_parameters())
    for name, master in masters.items():  # the masters are the fp32 init, not its bf16 rounding
        assert master.dtype == torch.float32 and torch.equal(master, fp32[name])
    assert all(id(p) in {id(m) for m in masters.values()} for g in trainer.optimizer.param_groups for p in g["params"])
    for step in range(3):
        out = trainer.train_step([_batch(step, device)])
        assert math.isfinite(out["loss"]) and not out["skipped"]
    w = "decoder.layers.0.mlp.fc1.weight"
    moved = (masters[w] - fp32[w]).abs()
    assert moved.max() > 0  # updates of ~1e-6 move the fp32 masters...
    param = dict(model.named_parameters())[w]
    assert torch.equal(param, masters[w].to(torch.bfloat16))  # ...and the model holds their rounding


def test_mixed_precision_state_dict_round_trip(device):
    trainer, _ = _trainer(torch.bfloat16, device=device)
    trainer.train_step([_batch(device=device)])
    saved = {k: v.clone() for k, v in trainer.precision.state_dict().items()}
    other, _ = _trainer(torch.bfloat16, device=device)
    other.precision.load_state_dict(saved)
    for (name, m), (_, p) in zip(other.precision.named_parameters(), other.model.named_parameters()):
        assert torch.equal(m, saved[name]) and torch.equal(p, m.to(torch.bfloat16))
    with pytest.raises(KeyError, match="no master weight for parameter"):
        other.precision.load_state_dict({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        MixedPrecision(tiny_gpt(), torch.float64)


def test_fp16_without_a_loss_scaler_is_refused():
    with pytest.raises(ValueError, match="fp16 training needs a DynamicLossScaler"):
        _trainer(torch.float16)


def test_loss_scaler_halves_on_overflow_and_grows_after_a_clean_window(device):
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(3, device=device))
    p.grad = torch.tensor([2048.0, 1024.0, -512.0], device=device)
    assert scaler.unscale_([p]) is False and p.grad.tolist() == [2.0, 1.0, -0.5]
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16, device=device))
    half.grad = torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float16, device=device)
    assert scaler.unscale_([p, half]) is True
    scaler.update(True)
    assert scaler.loss_scale == 512.0 and scaler.skipped_steps == 1
    for _ in range(2):
        scaler.update(False)
    assert scaler.loss_scale == 512.0
    scaler.update(False)
    assert scaler.loss_scale == 1024.0 and scaler.clean_steps == 0
    p.grad = torch.full((3,), float("nan"), device=device)
    p.main_grad = torch.ones(3, device=device)  # main_grad is what is read
    assert scaler.unscale_([p]) is False
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="backoff_factor=1.5"):
        DynamicLossScaler(backoff_factor=1.5)


def test_fp16_overflow_steps_are_skipped_without_corrupting_weights(device):
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=1000)
    trainer, _ = _trainer(torch.float16, scaler=scaler, device=device)
    model, precision = trainer.model, trainer.precision
    first = trainer.train_step([_batch(0, device)])
    assert not first["skipped"] and math.isfinite(first["grad_norm"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters_before = {n: m.detach().clone() for n, m in precision.named_parameters()}
    adam_before = {k: v.clone() for k, v in trainer.optimizer.state[precision.parameters()[0]].items()}
    lr_before = trainer.schedule.step_count

    victim = dict(model.named_parameters())["decoder.layers.0.attention.qkv.weight"]
    handle = victim.register_hook(lambda g: torch.full_like(g, float("inf")))  # an inf gradient
    out = trainer.train_step([_batch(1, device)])
    handle.remove()
    assert out["skipped"] and math.isnan(out["grad_norm"]) and math.isfinite(out["loss"])
    assert scaler.skipped_steps == 1 and scaler.loss_scale == 2.0**9
    assert trainer.schedule.step_count == lr_before
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
        assert p.grad is None or not p.grad.any(), f"{n} kept a gradient after the skipped step"
    for n, m in precision.named_parameters():
        assert torch.equal(m, masters_before[n])
    for k, v in trainer.optimizer.state[precision.parameters()[0]].items():
        assert torch.equal(v, adam_before[k]), f"AdamW {k} changed on a skipped step"

    after = trainer.train_step([_batch(2, device)])  # training goes on, with finite weights
    assert not after["skipped"] and math.isfinite(after["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
