"""megacore.training.DistributedOptimizer (ZeRO-1) and the reducer's reduce-scatter mode, across real gloo processes.

The reference is one process on the whole global batch with build_optimizer + MixedPrecision: DP ranks, each
on its shard of every micro-batch, must give the same losses and weights to round-off. Every rank computes the
reference locally from the same seeds. Checks are grouped into one spawned run per world size to keep the
multi-process start-up cost low.
"""

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.parallel.utils import run_distributed

STEPS = 4
MICRO = 2  # gradient accumulation
ROWS = 4  # rows of a global micro-batch (divisible by every DP size here)
SEQ = 16
VOCAB = 128
LR = 3e-3
CLIP = 0.5  # small enough that clipping acts in the first steps
SMALL_BUCKETS_MB = 0.05  # the model spreads over several buckets


def _model(seed=0):
    from megacore.models.registry import build
    from megacore.parallel import state

    torch.manual_seed(seed)
    tensor_parallel = state.model_parallel_is_initialized() and state.get_tensor_parallel_world_size() > 1
    return build("gpt-tiny", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, tensor_parallel=tensor_parallel)


def _global_batches(steps, seed=0):
    """``steps`` lists of MICRO global micro-batches {input_ids, labels} [ROWS, SEQ]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        mbs = []
        for _ in range(MICRO):
            rows = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g)
            mbs.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:].clone()})
        out.append(mbs)
    return out


def _shard(micro_batches, rank, world):
    return [{k: v.chunk(world)[rank] for k, v in mb.items()} for mb in micro_batches]


def _one_process_trainer(dtype, seed=0):
    """build_optimizer + MixedPrecision on one process, the reference."""
    from megacore.training import LRSchedule, MixedPrecision, Trainer, build_optimizer

    model = _model(seed)
    precision = MixedPrecision(model, dtype)
    optimizer = build_optimizer(precision, lr=LR, weight_decay=0.1)
    schedule = LRSchedule(optimizer, max_lr=LR, min_lr=LR / 10, warmup_steps=1, total_steps=2 * STEPS)
    return Trainer(model, optimizer, schedule, precision=precision, grad_accumulation=MICRO, clip=CLIP)


def _ddp_trainer(dtype, seed=0, distributed_optimizer=True, bucket_size_mb=SMALL_BUCKETS_MB):
    """Data-parallel: the distributed optimizer, or DDP's all-reduce with build_optimizer + MixedPrecision."""
    from megacore.parallel import DistributedDataParallel
    from megacore.training import DistributedOptimizer, LRSchedule, MixedPrecision, Trainer, build_optimizer

    model = _model(seed)
    precision = MixedPrecision(model, dtype)
    ddp = DistributedDataParallel(model, bucket_size_mb=bucket_size_mb, grad_dtype=torch.float32,
                                  reduce_scatter=distributed_optimizer)
    if distributed_optimizer:
        optimizer = precision = DistributedOptimizer(ddp, precision, lr=LR, weight_decay=0.1)
    else:
        optimizer = build_optimizer(precision, lr=LR, weight_decay=0.1)
    schedule = LRSchedule(optimizer, max_lr=LR, min_lr=LR / 10, warmup_steps=1, total_steps=2 * STEPS)
    return Trainer(ddp, optimizer, schedule, precision=precision, grad_accumulation=MICRO, clip=CLIP, ddp=ddp)


def _weights(trainer):
    if hasattr(trainer.optimizer, "wait_for_params"):
        trainer.optimizer.wait_for_params()
    model = getattr(trainer.model, "module", trainer.model)
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _state_bytes(optimizer) -> int:
    """Bytes of AdamW's two moments and the fp32 masters it steps on (this rank's)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            total += p.numel() * p.element_size()
            total += sum(optimizer.state[p][k].numel() * optimizer.state[p][k].element_size()
                         for k in ("exp_avg", "exp_avg_sq"))
    return total


# ---- training equals one process -------------------------------------------------------------------------------

def _check_training_matches_one_process(rank, world, dtype):
    batches = _global_batches(STEPS)
    reference, allreduce = _one_process_trainer(dtype), _ddp_trainer(dtype, distributed_optimizer=False)
    zero1 = _ddp_trainer(dtype)
    assert zero1.optimizer.ddp.reducer.num_buckets() >= 3
    # Round-off: summing in another order (split batch, norms over pieces) moves Adam's updates of the
    # near-zero gradients; in bf16 that flips the last bit of some weights (one ulp at 1 is 0.0078), and a
    # gradient that is ~0 in bf16 can change sign, so Adam steps that element the other way: at most 2 lr
    # apart per step (seen on an AMD EPYC: one bias element of 192 0.0108 apart after 4 steps).
    loss_rel, grad_norm_rel = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-3)
    weights_tol = dict(rtol=1e-4, atol=3e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2 * LR * STEPS)
    for mbs in batches:
        want = reference.train_step(mbs)
        shard = _shard(mbs, rank, world)
        base, got = allreduce.train_step(shard), zero1.train_step(shard)
        assert got["grad_norm"] > CLIP, "clipping did not act"
        assert got["lr"] == want["lr"] == base["lr"]
        for other in (base, want):  # DDP's all-reduce with MixedPrecision, and one process
            assert got["loss"] == pytest.approx(other["loss"], rel=loss_rel), (got, other)
            assert got["grad_norm"] == pytest.approx(other["grad_norm"], rel=grad_norm_rel), (got, other)
    got_w, base_w, want_w = _weights(zero1), _weights(allreduce), _weights(reference)
    assert got_w.keys() == want_w.keys()
    for name, want_p in want_w.items():
        torch.testing.assert_close(got_w[name], base_w[name], **weights_tol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(got_w[name], want_p, **weights_tol, msg=lambda m: f"{name}: {m}")
    # Every rank ends with the same full weights.
    for name, p in got_w.items():
        others = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(others, p)
        assert all(torch.equal(o, p) for o in others), name
    dist.barrier()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_data_parallel_2_with_the_distributed_optimizer_trains_like_one_process(dtype):
    run_distributed(_check_training_matches_one_process, 2, dtype, timeout_s=120)


def _check_with_tensor_parallel(rank, world):
    """TP 2 x DP 2: pieces of tensor-parallel shards are shards in the parallel plan (through model_param), so the
    norm counts each element once."""
    from megacore import parallel as mp

    mp.initialize_model_parallel(tensor_parallel_size=2)
    try:
        dp, dp_rank = mp.get_data_parallel_world_size(), mp.get_data_parallel_rank()
        allreduce, zero1 = _ddp_trainer(torch.float32, distributed_optimizer=False), _ddp_trainer(torch.float32)
        assert any(zero1.plan.is_sharded(p) for p in zero1.optimizer.parameters())
        for mbs in _global_batches(3):
            base, got = allreduce.train_step(_shard(mbs, dp_rank, dp)), zero1.train_step(_shard(mbs, dp_rank, dp))
            assert got["loss"] == pytest.approx(base["loss"], rel=1e-6)
            assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
        got_w, base_w = _weights(zero1), _weights(allreduce)
        for name, p in base_w.items():
            torch.testing.assert_close(got_w[name], p, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")
        saved = zero1.optimizer.full_state()  # this tensor-parallel rank's shapes
        for name, p in zero1.model.module.named_parameters():
            assert saved["master_params"][name].shape == p.shape, name
        dist.barrier()
    finally:
        mp.destroy_model_parallel()


def test_tensor_parallel_2_data_parallel_2_trains_like_ddp_all_reduce():
    run_distributed(_check_with_tensor_parallel, 4, timeout_s=180)


# ---- memory ----------------------------------------------------------------------------------------------------

def _check_memory(rank, world):
    (mbs,) = _global_batches(1)
    reference, zero1 = _one_process_trainer(torch.bfloat16), _ddp_trainer(torch.bfloat16, bucket_size_mb=25)
    reference.train_step(mbs)
    zero1.train_step(_shard(mbs, rank, world))
    full, mine = _state_bytes(reference.optimizer), _state_bytes(zero1.optimizer)
    per_rank = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(per_rank, torch.tensor([float(mine)], dtype=torch.float64))
    per_rank = [int(x.item()) for x in per_rank]
    # The pieces partition the parameters: together they are exactly the one-process state ...
    assert sum(per_rank) == full, (per_rank, full)
    # ... and each rank holds 1/DP of it (up to the alignment padding between parameters).
    assert abs(mine / full - 1 / world) < 0.02, (mine, full, world)
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_optimizer_state_per_rank_is_one_over_data_parallel_size(world):
    run_distributed(_check_memory, world, timeout_s=120)


# ---- full state ------------------------------------------------------------------------------------------------

def _to_one_process(saved, trainer):
    """Loads ``full_state`` output into a one-process build_optimizer + MixedPrecision trainer."""
    saved = copy.deepcopy(saved)  # torch's load_state_dict keeps CPU tensors as they are: no sharing
    optimizer, precision = trainer.optimizer, trainer.precision
    precision.load_state_dict(saved["master_params"])  # masters, and the model from them
    state, groups, index = {}, [], 0
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        assert sorted(saved_group["params"]) == sorted(group["names"])
        groups.append({**{k: v for k, v in saved_group.items() if k not in ("params", "fused", "foreach")},
                       "fused": group["fused"], "foreach": group["foreach"],
                       "params": list(range(index, index + len(group["names"])))})
        for name in group["names"]:
            state[index] = saved["state"][name]
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _one_process_full_state(trainer):
    optimizer, precision = trainer.optimizer, trainer.precision
    names = {id(p): n for n, p in precision.named_parameters()}
    return ({names[id(p)]: {k: v.detach().to("cpu", copy=True) for k, v in optimizer.state[p].items()}
             for g in optimizer.param_groups for p in g["params"]},
            {n: m.detach().to("cpu", copy=True) for n, m in precision.named_parameters()})


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert torch.equal(a[name][key].float(), b[name][key].float()), (name, key)


def _check_full_state_round_trip(rank, world):
    first, later = _global_batches(3, seed=1), _global_batches(2, seed=2)
    dtype = torch.bfloat16
    trainer = _ddp_trainer(dtype)
    for mbs in first:
        trainer.train_step(_shard(mbs, rank, world))
    saved = trainer.optimizer.full_state("test")
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # waits for the all-gathers
    schedule = trainer.schedule.state_dict()
    # Identical on every rank, shaped like the parameters, on CPU.
    model = trainer.model.module
    for name, p in model.named_parameters():
        master = saved["master_params"][name]
        assert master.shape == p.shape and master.device.type == "cpu" and master.dtype == torch.float32
        assert saved["state"][name]["exp_avg"].shape == p.shape and float(saved["state"][name]["step"]) == 3
        for t in (master, saved["state"][name]["exp_avg_sq"]):
            others = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(others, t)
            assert all(torch.equal(o, t) for o in others), name
        torch.testing.assert_close(master.to(dtype), p.detach(), rtol=0, atol=0)  # the model is the rounded master
    assert [g["params"] for g in saved["param_groups"]] == [g["names"] for g in saved["param_groups"]]
    assert sum(len(g["params"]) for g in saved["param_groups"]) == len(list(model.parameters()))
    assert trainer.optimizer.state_dict().keys() == saved.keys()

    want = [trainer.train_step(_shard(mbs, rank, world))["loss"] for mbs in later]

    # Into a fresh DP run (another seed: everything comes from the saved state): bit for bit.
    restored = _ddp_trainer(dtype, seed=7)
    restored.model.load_state_dict(weights)
    restored.optimizer.load_full_state(saved, "test")
    restored.schedule.load_state_dict(schedule)
    again = restored.optimizer.full_state("test")
    _assert_same_state(again["state"], saved["state"])
    _assert_same_state({"m": again["master_params"]}, {"m": saved["master_params"]})
    before = copy.deepcopy(saved)
    got = [restored.train_step(_shard(mbs, rank, world))["loss"] for mbs in later]
    assert got == want, (got, want)
    _assert_same_state(saved["state"], before["state"])  # the loaded state was copied, not shared

    # Into one process with AdamW + MixedPrecision: the same state bit for bit, and the same losses to round-off.
    single = _one_process_trainer(dtype, seed=7)
    single.model.load_state_dict(weights)
    _to_one_process(saved, single)
    single.schedule.load_state_dict(schedule)
    state, masters = _one_process_full_state(single)
    _assert_same_state(state, saved["state"])
    _assert_same_state({"m": masters}, {"m": saved["master_params"]})
    got = [single.train_step(mbs)["loss"] for mbs in later]
    assert got == pytest.approx(want, rel=2e-2), (got, want)

    # And one process's state loads into the distributed optimizer.
    single_state = {"param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["names"])}
                                     for g in single.optimizer.param_groups],
                    "state": state, "master_params": masters}
    restored.optimizer.load_full_state(single_state, "test")
    back = restored.optimizer.full_state("test")
    _assert_same_state(back["state"], state)
    _assert_same_state({"m": back["master_params"]}, {"m": masters})
    dist.barrier()


def test_full_state_round_trip_restores_the_optimizer_bit_for_bit():
    run_distributed(_check_full_state_round_trip, 2, timeout_s=120)


# ---- the reducer's reduce-scatter mode ----------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 13)  # 78 + 13 elements: no size divides the world evenly
        self.fc2 = nn.Linear(13, 13)
        self.head = nn.Linear(13, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _net_loss(model, x, y):
    return (model(x) - y).square().mean()


def _check_reducer_reduce_scatter(rank, world):
    from megacore.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4 * world, 6, generator=g), torch.randn(4 * world, 3, generator=g)
    reference = _Net()
    _net_loss(reference, x, y).backward()
    want = {id(p): q.grad for p, q in zip(_Net().parameters(), reference.parameters())}

    ddp = DistributedDataParallel(_Net(), bucket_size_mb=400 / 2**20, reduce_scatter=True)
    reducer, params = ddp.reducer, ddp.parameters_in_bucket_order()
    assert reducer.reduce_scatter() and reducer.rank() == rank and reducer.num_buckets() >= 2
    names = {id(p): n for n, p in ddp.named_parameters()}
    want = {names[id(p)]: g for p, g in zip(ddp.module.parameters(), (q.grad for q in reference.parameters()))}
    for b in range(reducer.num_buckets()):
        n = reducer.bucket_buffer(b).numel()
        start, end = reducer.shard_range(b)
        # Padded to a multiple of world * 16 fp32 elements (64 bytes), split in equal slices.
        assert n % (world * 16) == 0 and (start, end) == (rank * n // world, (rank + 1) * n // world)
        for i in reducer.bucket_params(b):
            main = reducer.main_grad(i)
            assert main.data_ptr() == reducer.bucket_buffer(b).data_ptr() + 4 * reducer.param_offset(i)
    # Padding is exercised: some bucket's parameters end before a multiple of the world size.
    ends = [max(reducer.param_offset(i) + params[i].numel() for i in reducer.bucket_params(b))
            for b in range(reducer.num_buckets())]
    assert any(end % world for end in ends), ends

    def expected_slice(b, scale=1.0):
        flat = torch.zeros(reducer.bucket_buffer(b).numel())
        for i in reducer.bucket_params(b):
            off, p = reducer.param_offset(i), params[i]
            flat[off: off + p.numel()] = want[names[id(p)]].reshape(-1) * scale
        start, end = reducer.shard_range(b)
        return flat[start:end]

    xs, ys = x.chunk(world)[rank].clone().requires_grad_(), y.chunk(world)[rank]
    launched_when_backward_reached_the_input = []
    xs.register_hook(lambda grad: launched_when_backward_reached_the_input.append(reducer.num_allreduces_launched()))
    _net_loss(ddp, xs, ys).backward()
    assert launched_when_backward_reached_the_input[0] >= 1, "no bucket was reduce-scattered during backward"
    assert reducer.num_allreduces_launched() == reducer.num_buckets()
    for b in range(reducer.num_buckets()):
        start, end = reducer.shard_range(b)
        torch.testing.assert_close(reducer.bucket_buffer(b)[start:end], expected_slice(b), rtol=1e-5, atol=1e-6)

    # Gradient accumulation: no_sync backwards only add; the reducing one reduce-scatters the sum once.
    ddp.zero_grad(set_to_none=False)
    with ddp.no_sync():
        _net_loss(ddp, xs, ys).backward()
    assert reducer.num_allreduces_launched() == reducer.num_buckets()
    _net_loss(ddp, xs, ys).backward()
    assert reducer.num_allreduces_launched() == 2 * reducer.num_buckets()
    for b in range(reducer.num_buckets()):
        start, end = reducer.shard_range(b)
        torch.testing.assert_close(reducer.bucket_buffer(b)[start:end], expected_slice(b, 2.0), rtol=1e-5, atol=1e-6)

    # The default mode is unchanged: one slice, the whole bucket.
    plain = DistributedDataParallel(_Net(), bucket_size_mb=400 / 2**20).reducer
    assert not plain.reduce_scatter()
    assert [plain.shard_range(b) for b in range(plain.num_buckets())] == [
        [0, plain.bucket_buffer(b).numel()] for b in range(plain.num_buckets())]
    dist.barrier()


@pytest.mark.parametrize("world", [2, 3])
def test_reducer_reduce_scatter_leaves_each_rank_the_mean_of_its_slice(world):
    run_distributed(_check_reducer_reduce_scatter, world, timeout_s=120)


def _rank_0_skips_collectives(rank, world):
    from megacore.parallel import DistributedDataParallel
    from megacore.training import DistributedOptimizer

    group = dist.new_group(timeout=timedelta(seconds=4))
    ddp = DistributedDataParallel(_Net(), data_parallel_group=group, reduce_scatter=True)
    if rank == 1:
        with pytest.raises(RuntimeError, match=r"megacore.parallel.DistributedDataParallel: the gradient "
                                               r"reduce-scatter of bucket 0 of 1 \(6 parameters\) "
                                               r"(failed or timed out|did not)"):
            _net_loss(ddp, torch.randn(2, 6), torch.randn(2, 3)).backward()
    dist.barrier()  # the default group: rank 0 waits here for rank 1's timeout

    group = dist.new_group(timeout=timedelta(seconds=4))
    model = _Net()
    ddp = DistributedDataParallel(model, data_parallel_group=group, reduce_scatter=True)
    optimizer = DistributedOptimizer(ddp, model, lr=LR)
    if rank == 1:
        optimizer.copy_master_to_model()  # rank 0 never launches its all-gathers
        with pytest.raises(RuntimeError, match=r"megacore.training.DistributedOptimizer: the parameter all-gather of "
                                               r"bucket 0 of 1 \(6 parameters\) (failed or timed out|did not)"):
            model(torch.randn(2, 6))
    dist.barrier()


def test_a_rank_that_skips_a_collective_makes_its_peer_time_out_naming_it():
    run_distributed(_rank_0_skips_collectives, 2, timeout_s=60)


# ---- overlap, norms, overflow ----------------------------------------------------------------------------------

def _check_overlap_norm_and_overflow(rank, world):
    from megacore.training import DynamicLossScaler, clip_grad_norm

    trainer = _ddp_trainer(torch.bfloat16)
    optimizer, model = trainer.optimizer, trainer.model.module
    optimizer.load_full_state(optimizer.full_state())  # as a resumed run does, before any forward
    (mbs,) = _global_batches(1)
    trainer.train_step(_shard(mbs, rank, world))
    # After the step every bucket's parameter all-gather is in flight, waited for only as forward reaches it.
    in_flight = lambda: sum(bucket.work is not None for bucket in optimizer._buckets)  # noqa: E731
    assert in_flight() == len(optimizer._buckets) >= 3
    seen = []
    model.embedding.register_forward_pre_hook(lambda *args: seen.append(in_flight()))
    model.final_norm.register_forward_pre_hook(lambda *args: seen.append(in_flight()))
    with torch.no_grad():
        trainer.model(mbs[0]["input_ids"][:1])
    assert seen[0] > 0 and seen[0] < len(optimizer._buckets), seen  # the embedding waited for its buckets only
    assert seen[1] == 0 and in_flight() == 0, seen

    # The norm and the overflow flag are the whole model's, the same on every rank.
    pieces = optimizer.parameters()
    for p in pieces:
        p.grad = torch.full_like(p, float(rank + 1))
    norm = clip_grad_norm(pieces, 0.0, data_parallel_sharded=True)
    counts = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([float(sum(p.numel() for p in pieces))]))
    want = sum(float(c) * (r + 1) ** 2 for r, c in enumerate(counts)) ** 0.5
    assert float(norm) == pytest.approx(want, rel=1e-5)
    if rank == world - 1:
        pieces[0].grad[0] = float("inf")
    assert DynamicLossScaler().unscale_(pieces, data_parallel_sharded=True) is True
    assert DynamicLossScaler().unscale_([p for p in pieces if torch.isfinite(p.grad).all()],
                                        data_parallel_sharded=True) is False
    dist.barrier()


def test_param_all_gathers_overlap_the_next_forward_and_norms_reduce_over_data_parallel_ranks():
    run_distributed(_check_overlap_norm_and_overflow, 2, timeout_s=120)


# ---- errors ----------------------------------------------------------------------------------------------------

def _check_errors(rank, world):
    from megacore.parallel import DistributedDataParallel
    from megacore.training import DistributedOptimizer

    name = "megacore.training.DistributedOptimizer"
    model = _model()
    with pytest.raises(ValueError, match=f"{name}: ddp all-reduces its gradients \\(reduce_scatter=False\\)"):
        DistributedOptimizer(DistributedDataParallel(model, grad_dtype=torch.float32), model, lr=LR)
    model = _model().to(torch.bfloat16)
    with pytest.raises(TypeError, match=f"{name}: ddp's gradient buffers are torch.bfloat16 \\(bucket 0\\); "
                                        "expected torch.float32"):
        DistributedOptimizer(DistributedDataParallel(model, reduce_scatter=True), model, lr=LR)
    model = _model()
    ddp = DistributedDataParallel(model, grad_dtype=torch.float32, reduce_scatter=True)
    with pytest.raises(TypeError, match=f"{name}: ddp must be a megacore.parallel.DistributedDataParallel, got "
                                        "GPTModel"):
        DistributedOptimizer(model, model, lr=LR)
    with pytest.raises(ValueError, match=f"{name}: model is not the module ddp wraps"):
        DistributedOptimizer(ddp, _model(), lr=LR)
    with pytest.raises(TypeError, match=f"{name}: model must be the torch.nn.Module that ddp wraps"):
        DistributedOptimizer(ddp, "model", lr=LR)
    with pytest.raises(ValueError, match=f"{name}: lr=-1 must be a number >= 0"):
        DistributedOptimizer(ddp, model, lr=-1)
    with pytest.raises(ValueError, match=f"{name}: betas=\\(0.9, 1.0\\) must be two numbers in \\[0, 1\\)"):
        DistributedOptimizer(ddp, model, lr=LR, betas=(0.9, 1.0))
    optimizer = DistributedOptimizer(ddp, model, lr=LR)
    with pytest.raises(KeyError, match="megacore.training.test: the state has no 'state'"):
        optimizer.load_full_state({"param_groups": []}, "test")
    saved = optimizer.full_state()
    saved["master_params"]["final_norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"megacore.training.test: master weight final_norm.weight has shape \[3\], "
                                         r"expected \[64\]"):
        optimizer.load_full_state(saved, "test")
    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][1:]
    with pytest.raises(ValueError, match="megacore.training.test: parameter group 0 of the state holds"):
        optimizer.load_full_state(saved, "test")
    dist.barrier()


def test_distributed_optimizer_errors_name_it_and_the_argument():
    run_distributed(_check_errors, 1, timeout_s=60)
