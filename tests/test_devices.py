"""The models, generation, the trainer, checkpoints and DDP on every device present (the ``device`` fixture:
CPU always, CUDA on a GPU machine), each compared with a CPU run from the same seeds. On a CPU-only machine
the CPU case still runs the same code (CPU against CPU), so these tests are exercised everywhere and fail on
a GPU only where CUDA really differs."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from megacore.models import build
from megacore.training import LRSchedule, Trainer, build_optimizer, generate
from megacore.training.checkpoint import load_checkpoint, save_checkpoint
from megacore.training.precision import DynamicLossScaler, MixedPrecision

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=101, max_position_embeddings=32,
             hidden_dropout=0.0, attention_dropout=0.0)
# Relative to the largest expected magnitude: the GEMMs of a CUDA run group their sums differently.
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} vs {TOLERANCE[dtype] * scale:.3g}"


def _pair(preset: str, device: str, **overrides):
    """The same model twice, from one seed: on CPU and on ``device``."""
    torch.manual_seed(0)
    cpu = build(preset, **{**SMALL, **overrides})
    other = build(preset, **{**SMALL, **overrides})
    other.load_state_dict(cpu.state_dict())
    return cpu, other.to(device)


def _masked_batch(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 101, (2, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny"])
def test_models_forward_and_backward_on_the_device_match_cpu(preset, device):
    """GPT (causal LM) and BERT (MLM + NSP heads). ELECTRA samples its replacements from the device's own
    generator, so its CUDA run is not the CPU's; the layer and heads it shares are covered here."""
    cpu, model = _pair(preset, device)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))

    def loss_of(m, dev):
        if preset.startswith("gpt"):
            return m(ids.to(dev), labels=torch.roll(ids, -1, 1).to(dev)).float().mean()
        return m(**_masked_batch(dev)).loss
    expected, got = loss_of(cpu, "cpu"), loss_of(model, device)
    _close(got, expected, torch.float32, f"{preset} loss")
    expected.backward()
    got.backward()
    for (name, p), (_, q) in zip(cpu.named_parameters(), model.named_parameters()):
        if p.grad is not None:
            _close(q.grad, p.grad, torch.float32, f"{preset} grad of {name}")


def test_greedy_generation_with_the_kv_cache_on_the_device_matches_cpu(device):
    cpu, model = _pair("gpt-tiny", device)
    prompt = [5, 17, 42, 8]
    assert generate(model.eval(), prompt, 10, greedy=True) == generate(cpu.eval(), prompt, 10, greedy=True)


def _steps(model, dtype, device, n=3):
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision, lr=1e-3, weight_decay=0.01)
    schedule = LRSchedule(optimizer, max_lr=1e-3, min_lr=1e-4, warmup_steps=1, total_steps=n)
    scaler = DynamicLossScaler() if dtype == torch.float16 else None
    trainer = Trainer(model, optimizer, schedule, precision=precision, scaler=scaler, max_skipped_steps=8)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(n):
        ids = torch.randint(0, 101, (2, 13), generator=g)
        batch = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device)}
        losses.append(trainer.train_step([batch])["loss"])
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_steps_on_the_device_match_cpu(dtype, device):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 is emulated on CPUs; the CPU reference for it runs in the CUDA case")
    cpu, model = _pair("gpt-tiny", device)
    reference_dtype = torch.float32 if dtype == torch.float16 else dtype
    expected = _steps(cpu, reference_dtype, "cpu")
    got = _steps(model, dtype, device)
    _close(torch.tensor(got), torch.tensor(expected), dtype, f"losses in {dtype}")


def test_a_checkpoint_saved_on_the_device_loads_on_cpu_and_back_with_its_rng(device, tmp_path):
    cpu, model = _pair("gpt-tiny", device)
    optimizer = build_optimizer(model, lr=1e-3)
    torch.manual_seed(11)
    if device == "cuda":
        torch.cuda.manual_seed(11)
    save_checkpoint(tmp_path, 1, model, optimizer)
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state() if device == "cuda" else None
    torch.rand(3)
    if device == "cuda":
        torch.rand(3, device="cuda")
    fresh_cpu = build("gpt-tiny", **SMALL)
    load_checkpoint(tmp_path, fresh_cpu, restore_rng=False)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh_cpu.named_parameters()):
        assert torch.equal(p.detach().cpu(), q.detach()), name
    back = build("gpt-tiny", **SMALL).to(device)
    load_checkpoint(tmp_path, back, build_optimizer(back, lr=1e-3))
    assert torch.equal(torch.get_rng_state(), rng_cpu)
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), rng_cuda)
    del cpu


def _init_world_of_one(backend: str, monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group(backend, rank=0, world_size=1)


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_ddp_of_one_rank_on_the_device_gives_the_plain_gradients(backend, device, monkeypatch):
    """DDP over NCCL (CUDA), and over gloo with CPU or CUDA tensors: one rank's averaged gradients are the
    plain backward's."""
    from megacore.parallel import DistributedDataParallel

    if backend == "nccl" and (device != "cuda" or not dist.is_nccl_available()):
        pytest.skip("NCCL takes CUDA tensors")
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    cpu, model = _pair("gpt-tiny", device)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(4))
    cpu(ids, labels=torch.roll(ids, -1, 1)).mean().backward()
    _init_world_of_one(backend, monkeypatch)
    try:
        ddp = DistributedDataParallel(model, bucket_size_mb=0.01, data_parallel_group=dist.group.WORLD)
        ddp(ids.to(device), labels=torch.roll(ids, -1, 1).to(device)).mean().backward()
        for (name, p), (_, q) in zip(cpu.named_parameters(), model.named_parameters()):
            grad = q.main_grad if getattr(q, "main_grad", None) is not None else q.grad
            _close(grad, p.grad, torch.float32, f"DDP grad of {name}")
    finally:
        dist.destroy_process_group()


def test_megacore_train_trains_on_this_processs_gpu_when_there_is_one(monkeypatch):
    from megacore.training import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run._train_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run._train_device() == torch.device("cuda", 3)


def test_megacore_train_runs_on_the_device(device, corpus_cache, tmp_path, monkeypatch):
    """A few steps of the real command on each device present; its header names the device."""
    from megacore.training.run import parse_config, train

    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logs = []
    result = train(parse_config(dict(cache_dir=corpus_cache, output=str(tmp_path / "run"), seq_len=32,
                                     vocab_size=1000, micro_batch_size=2, global_batch_size=2, train_steps=3,
                                     eval_interval=100, eval_batches=1, log_interval=1, save_interval=100,
                                     progress=False, model_overrides={"num_layers": 1, "hidden_size": 32,
                                                                      "num_attention_heads": 2})), log=logs.append)
    assert any(f" on {device}, tensor-parallel" in m for m in logs), logs
    assert result["valid_loss"] > 0 and (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
