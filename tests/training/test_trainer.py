"""The training step: short runs converge, runs are reproducible bit for bit on CPU, gradient accumulation
equals one big batch, and tensor-parallel (TP=2) and data-parallel (DP=2) training equal one process."""

import pytest
import torch

from megacore.training import LRSchedule, Trainer, build_optimizer
from tests.parallel.utils import gather_shards, run_distributed, shard_dims
from tests.training.test_optim import tiny_gpt

VOCAB = 101


def repeated_batches(steps, micro=1, batch=4, seq=12, seed=0):
    """A learnable stream: every row is a window of one fixed random sequence repeated over and over."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, VOCAB, (7,), generator=g).repeat(20)
    out = []
    for _ in range(steps):
        mbs = []
        for _ in range(micro):
            starts = torch.randint(0, 7, (batch,), generator=g)
            rows = torch.stack([pattern[s: s + seq + 1] for s in starts.tolist()])
            mbs.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:].clone()})
        out.append(mbs)
    return out


def make_trainer(seed=0, lr=3e-3, steps=40, micro=1, model=None, **model_kw):
    torch.manual_seed(seed)
    model = model or tiny_gpt(**model_kw)
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.01)
    schedule = LRSchedule(optimizer, max_lr=lr, min_lr=lr / 10, warmup_steps=5, total_steps=steps)
    return Trainer(model, optimizer, schedule, grad_accumulation=micro, clip=1.0)


def test_a_short_run_converges():
    trainer = make_trainer(steps=40, lr=1e-2)
    losses = [trainer.train_step(mbs)["loss"] for mbs in repeated_batches(40)]
    assert losses[0] > 4.0  # ~ln(101) at init
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses


def test_metrics_of_a_step():
    trainer = make_trainer(micro=2)
    out = trainer.train_step(repeated_batches(1, micro=2)[0])
    assert set(out) == {"loss", "grad_norm", "lr", "skipped", "tokens"}
    assert out["tokens"] == 2 * 4 * 12 and out["skipped"] is False
    assert out["lr"] == pytest.approx(3e-3 / 5) and trainer.schedule.lr == pytest.approx(2 * 3e-3 / 5)
    with pytest.raises(ValueError, match="got 1 micro-batches, expected grad_accumulation=2"):
        trainer.train_step(repeated_batches(1, micro=1)[0])


def test_ignored_labels_do_not_count_in_the_loss():
    trainer = make_trainer()
    (mb,) = repeated_batches(1)[0]
    masked = dict(mb, labels=mb["labels"].clone())
    masked["labels"][:, 6:] = -100
    full = trainer.loss_fn(trainer.model, mb).item()
    half = trainer.loss_fn(trainer.model, masked).item()
    per_token = trainer.model(mb["input_ids"], labels=mb["labels"])
    assert half == pytest.approx(per_token[:, :6].mean().item(), rel=1e-6) and full != half


def test_runs_are_reproducible_bit_for_bit():
    def run():
        trainer = make_trainer(seed=5, micro=2, hidden_dropout=0.1, attention_dropout=0.1)  # dropout draws from the RNG
        losses = [trainer.train_step(mbs)["loss"] for mbs in repeated_batches(6, micro=2)]
        return losses, [p.detach().clone() for p in trainer.model.parameters()]

    (la, wa), (lb, wb) = run(), run()
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(wa, wb))


def test_gradient_accumulation_equals_one_big_batch():
    big = make_trainer(micro=1)
    acc = make_trainer(micro=2)
    for (mb,) in repeated_batches(4, batch=4):
        halves = [{k: v[:2] for k, v in mb.items()}, {k: v[2:] for k, v in mb.items()}]
        a, b = big.train_step([mb]), acc.train_step(halves)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5)  # Adam amplifies tiny-gradient noise


def _check_tensor_parallel_training(rank, world):
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel
    from megacore.parallel.layers import merge_weights

    initialize_model_parallel(world)
    group = get_tensor_parallel_group()
    batches = repeated_batches(5, micro=2)
    for sp in (False, True):
        runs = []
        for tp in (False, True):
            trainer = make_trainer(micro=2, tensor_parallel=tp, sequence_parallel=sp and tp)
            metrics = [trainer.train_step(mbs) for mbs in batches]
            weights = {}
            dims = shard_dims(trainer.model, world)
            for name, p in trainer.model.named_parameters():
                w = p.detach()
                if dims[name] is not None:
                    w = merge_weights(gather_shards(w, group, world), dims[name])
                weights[name] = w[:VOCAB] if name == "embedding.word.weight" else w
            runs.append((metrics, weights))
        (m1, w1), (m2, w2) = runs
        for a, b in zip(m1, m2):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (sp, a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (sp, a, b)
        for name, w in w1.items():
            torch.testing.assert_close(w2[name], w, rtol=1e-4, atol=1e-5, msg=lambda m: f"sp={sp} {name}: {m}")
    destroy_model_parallel()


def test_tensor_parallel_2_training_equals_tensor_parallel_1():
    run_distributed(_check_tensor_parallel_training, 2, timeout_s=180, collective_timeout_s=60)


def _check_data_parallel_training(rank, world):
    from megacore.parallel import DistributedDataParallel, destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)  # data-parallel size = world
    batches = repeated_batches(4, micro=2, batch=4)
    whole = make_trainer(micro=2)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(tiny_gpt())
    optimizer = build_optimizer(ddp, lr=3e-3, weight_decay=0.01)
    schedule = LRSchedule(optimizer, max_lr=3e-3, min_lr=3e-4, warmup_steps=5, total_steps=40)
    sharded = Trainer(ddp, optimizer, schedule, grad_accumulation=2, ddp=ddp)
    for mbs in batches:
        mine = [{k: v[rank * 2: rank * 2 + 2] for k, v in mb.items()} for mb in mbs]  # this rank's half
        a, b = whole.train_step(mbs), sharded.train_step(mine)
        assert b["tokens"] == a["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for p, q in zip(whole.model.parameters(), ddp.module.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=5e-5)

    # bf16 parameters, fp32 gradient buckets (main_grad) and fp32 masters: follows the fp32 run closely
    from megacore.training import MixedPrecision

    torch.manual_seed(0)
    model = tiny_gpt()
    precision = MixedPrecision(model, torch.bfloat16)
    ddp = DistributedDataParallel(model, grad_dtype=torch.float32)
    optimizer = build_optimizer(precision, lr=3e-3, weight_decay=0.01)
    schedule = LRSchedule(optimizer, max_lr=3e-3, min_lr=3e-4, warmup_steps=5, total_steps=40)
    bf16 = Trainer(ddp, optimizer, schedule, precision=precision, grad_accumulation=2, ddp=ddp)
    for mbs in batches:
        mine = [{k: v[rank * 2: rank * 2 + 2] for k, v in mb.items()} for mb in mbs]
        out = bf16.train_step(mine)
    assert out["loss"] == pytest.approx(a["loss"], rel=2e-2)
    for m, p in zip(precision.parameters(), whole.model.parameters()):
        torch.testing.assert_close(m, p, rtol=0, atol=2e-2)
    destroy_model_parallel()


def test_data_parallel_2_training_with_accumulation_equals_one_process():
    run_distributed(_check_data_parallel_training, 2, timeout_s=180, collective_timeout_s=60)


def _profiled_names(fn) -> list[str]:
    """The names of the events torch.profiler records on CPU while ``fn()`` runs, in start order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in sorted(prof.events(), key=lambda e: e.time_range.start)]


def test_a_step_shows_its_phases_in_torch_profiler():
    trainer = make_trainer(micro=2)
    names = _profiled_names(lambda: trainer.train_step(repeated_batches(1, micro=2)[0]))
    phases = [n for n in names if n.startswith("megacore.") and "transformer_layer" not in n]
    assert phases == ["megacore.train_step", "megacore.forward", "megacore.backward", "megacore.forward",
                      "megacore.backward", "megacore.loss_sync", "megacore.optimizer"]
    assert "megacore.transformer_layer.attention" in names  # the C++ layer's phases, inside forward


def _check_data_parallel_step_shows_grad_sync(rank, world):
    from megacore.parallel import DistributedDataParallel, destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(tiny_gpt())
    optimizer = build_optimizer(ddp, lr=3e-3, weight_decay=0.01)
    trainer = Trainer(ddp, optimizer, None, grad_accumulation=1, ddp=ddp)
    names = _profiled_names(lambda: trainer.train_step(repeated_batches(1)[0]))
    assert names.count("megacore.grad_sync") == 1, [n for n in names if n.startswith("megacore.")]
    destroy_model_parallel()


def test_a_data_parallel_step_shows_grad_sync_in_torch_profiler():
    run_distributed(_check_data_parallel_step_shows_grad_sync, 1)
