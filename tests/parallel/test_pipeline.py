"""Pipeline parallelism: the schedules against their definition, and training through real gloo processes at
PP 2 and 4, interleaved, and with tensor and data parallelism, against one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megacore.parallel import pipeline
from megacore.parallel.pipeline import BACKWARD, FORWARD, Op, schedule
from tests.parallel.utils import run_distributed

# ---- the schedules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("P,m", [(2, 4), (4, 8), (4, 2), (3, 5), (1, 3)])
def test_1f1b_is_warmup_then_alternating_then_cooldown(P, m):
    for rank in range(P):
        ops = schedule(m, P, rank)
        warmup = min(P - rank - 1, m)
        assert len(ops) == 2 * m
        assert [o.kind for o in ops[:warmup]] == [FORWARD] * warmup
        steady = ops[warmup: warmup + 2 * (m - warmup)]
        assert [o.kind for o in steady] == [FORWARD, BACKWARD] * (m - warmup)
        assert [o.kind for o in ops[warmup + 2 * (m - warmup):]] == [BACKWARD] * warmup
        assert [o.microbatch for o in ops if o.kind == FORWARD] == list(range(m))
        assert [o.microbatch for o in ops if o.kind == BACKWARD] == list(range(m))
        assert all(o.chunk == 0 for o in ops)


def test_1f1b_keeps_at_most_p_minus_rank_microbatches_in_flight():
    P, m = 4, 8
    for rank in range(P):
        live, peak = 0, 0
        for op in schedule(m, P, rank):
            live += 1 if op.kind == FORWARD else -1
            peak = max(peak, live)
        assert peak == P - rank  # activation memory is bounded by the stage's depth, not by m


def test_interleaved_order_follows_megatron():
    P, V, m = 2, 2, 4
    ops = schedule(m, P, 0, V)
    forwards = [(o.microbatch, o.chunk) for o in ops if o.kind == FORWARD]
    # groups of P micro-batches go through chunk 0, then chunk 1, then the next group
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    backwards = [(o.microbatch, o.chunk) for o in ops if o.kind == BACKWARD]
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]
    assert pipeline.warmup_forwards(m, P, 0, V) == 2 * (P - 1) + (V - 1) * P
    assert pipeline.warmup_forwards(m, P, 1, V) == (V - 1) * P
    assert pipeline.warmup_forwards(P, P, 1, V) == P * V  # m == P: every forward first


def _simulate(P: int, m: int, V: int) -> int:
    """Runs every rank's schedule against the data dependencies (a forward needs the previous virtual stage's
    forward of that micro-batch, a backward the next one's backward and its own forward); returns the number
    of time steps, or raises on a deadlock."""
    queues = {r: list(schedule(m, P, r, V)) for r in range(P)}
    done = set()
    stages = P * V
    steps = 0
    while any(queues.values()):
        progressed = []
        for r, q in queues.items():
            if not q:
                continue
            op = q[0]
            v = op.chunk * P + r
            if op.kind == FORWARD:
                ready = v == 0 or (FORWARD, op.microbatch, v - 1) in done
            else:
                ready = (FORWARD, op.microbatch, v) in done and (v == stages - 1 or (BACKWARD, op.microbatch, v + 1)
                                                                 in done)
            if ready:
                progressed.append((r, (op.kind, op.microbatch, v)))
        if not progressed:
            raise AssertionError(f"deadlock: heads {[q[0] if q else None for q in queues.values()]}")
        for r, key in progressed:
            queues[r].pop(0)
            done.add(key)
        steps += 1
    return steps


@pytest.mark.parametrize("P,m,V", [(2, 4, 1), (4, 8, 1), (4, 3, 1), (2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 2, 2)])
def test_schedules_never_deadlock(P, m, V):
    steps = _simulate(P, m, V)
    assert steps >= 2 * m * V  # a lower bound: each rank runs 2 m V operations one at a time


def test_schedule_errors():
    with pytest.raises(ValueError, match="multiple of the pipeline-parallel size 4"):
        schedule(6, 4, 0, 2)
    with pytest.raises(ValueError, match="rank=4 is not in"):
        schedule(4, 4, 4)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        schedule(0, 2, 0)


def test_bubble_fraction():
    assert pipeline.bubble_fraction(8, 4) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction(8, 4, 2) == pytest.approx(3 / 19)
    assert pipeline.bubble_fraction(8, 1) == 0


def test_stage_layers_split_and_errors():
    assert pipeline.stage_layers(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    with pytest.raises(ValueError, match="6 layers do not divide into pipeline_parallel_size 4"):
        pipeline.stage_layers(6, 4)
    with pytest.raises(ValueError, match="virtual_pipeline_parallel_size 2 = 8"):
        pipeline.stage_layers(6, 4, 2)


# ---- cutting a model ------------------------------------------------------------------------------------------

TINY = dict(vocab_size=61, hidden_size=32, num_layers=4, num_attention_heads=4, max_position_embeddings=16,
            hidden_dropout=0.0, attention_dropout=0.0)


def _gpt(**overrides):
    from megacore.models.registry import build

    torch.manual_seed(0)
    return build("gpt-tiny", **{**TINY, **overrides})


def test_cut_stage_keeps_names_and_parts():
    full = dict(_gpt().named_parameters())
    first = pipeline.cut_stage(_gpt(), 0, 2)
    last = pipeline.cut_stage(_gpt(), 1, 2)
    first_names, last_names = set(dict(first.named_parameters())), set(dict(last.named_parameters()))
    assert first_names | last_names == set(full)
    assert first_names & last_names == {"embedding.word.weight"}  # the tied copy
    assert {n for n in first_names if ".layers." in n} == {n for n in full if n.startswith(("decoder.layers.0.",
                                                                                             "decoder.layers.1."))}
    assert "final_norm.weight" in last_names and "embedding.position.weight" not in last_names
    assert last.pipeline.tied_copies == {"embedding.word.weight"} and first.pipeline.tied_copies == frozenset()
    for name, p in last.named_parameters():
        torch.testing.assert_close(p, full[name], rtol=0, atol=0)
    middle = pipeline.cut_stage(_gpt(num_layers=6), 1, 3)
    assert {n.split(".")[0] for n, _ in middle.named_parameters()} == {"decoder"}


def test_cut_stage_errors():
    with pytest.raises(ValueError, match="4 layers do not divide into pipeline_parallel_size 3"):
        pipeline.cut_stage(_gpt(), 0, 3)
    with pytest.raises(TypeError, match="StagedModel"):
        pipeline.cut_stage(torch.nn.Linear(2, 2), 0, 2)
    model = pipeline.cut_stage(_gpt(), 0, 2)
    with pytest.raises(ValueError, match="already cut"):
        pipeline.cut_stage(model, 0, 2)
    stray = _gpt()
    stray.extra = torch.nn.Linear(2, 2)  # no stage declares it: no stage would know whether it holds it
    with pytest.raises(ValueError, match=r"GPTModel's parameters \['extra.weight', 'extra.bias'\] are in none of"):
        pipeline.cut_stage(stray, 0, 2)


# ---- training through real processes ---------------------------------------------------------------------------

STEPS, SEQ, MICRO = 3, 8, 2


def _batches(family: str, count: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, TINY["vocab_size"], (MICRO, SEQ), generator=g)
        if family == "gpt":
            labels = torch.randint(0, TINY["vocab_size"], (MICRO, SEQ), generator=g)
            labels[0, :2] = -100
            out.append({"input_ids": ids, "labels": labels})
        else:
            labels = torch.full((MICRO, SEQ), -100)
            labels[:, 1::3] = ids[:, 1::3]
            masked_ids = ids.masked_fill(labels != -100, 3)
            mask = torch.ones(MICRO, SEQ, dtype=torch.long)
            mask[1, -2:] = 0
            batch = {"input_ids": masked_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
            if family == "bert":
                batch.update(labels=labels, next_sentence_label=torch.tensor([0, 1]))
            else:
                batch.update(mlm_labels=labels)
            out.append(batch)
    return out


def _build(family: str, **overrides):
    from megacore.models.registry import build

    torch.manual_seed(0)
    if family == "gpt":
        return build("gpt-tiny", **{**TINY, **overrides})
    fields = dict(TINY, max_position_embeddings=SEQ, type_vocab_size=2, **overrides)
    if family == "bert":
        return build("bert-tiny", **fields)
    return build("electra-small", **dict(fields, embedding_size=16, ffn_hidden_size=64))


def _loss_fn(family: str):
    if family == "gpt":
        return None  # masked_mean_loss
    return lambda model, batch: model(**batch).loss


def _train(model, family: str, micro_batches: list[list[dict]], dtype=torch.float32, ddp=None,
           distributed_optimizer: bool = False):
    from megacore.training import DistributedOptimizer, LRSchedule, MixedPrecision, Trainer, build_optimizer
    from megacore.training.precision import DynamicLossScaler

    precision = MixedPrecision(model, dtype)
    if ddp is not None:
        model = ddp(model)
    if distributed_optimizer:
        optimizer = precision = DistributedOptimizer(model, precision, lr=1e-2, weight_decay=0.1,
                                                     overlap_param_gather=False)
    else:
        optimizer = build_optimizer(precision, lr=1e-2, weight_decay=0.1)
    schedule_ = LRSchedule(optimizer, max_lr=1e-2, warmup_steps=1, total_steps=STEPS)
    # fp16: a scale so large that the first step overflows (skipped on every stage alike), then backs off fast
    scaler = DynamicLossScaler(init_scale=2.0**30, backoff_factor=2.0**-10) if dtype == torch.float16 else None
    trainer = Trainer(model, optimizer, schedule_, precision=precision, grad_accumulation=len(micro_batches[0]),
                      clip=0.5, ddp=model if ddp is not None else None, loss_fn=_loss_fn(family), scaler=scaler)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # ELECTRA's sampling: the same draws on the first stage and one process
        m = trainer.train_step(micro_batches[step])
        losses.append((m["loss"], m["grad_norm"] if not m["skipped"] else "skipped"))
    return losses


def _reference(family: str, m_total: int, dtype=torch.float32, **overrides):
    model = _build(family, **overrides)
    batches = [_batches(family, m_total, seed=step) for step in range(STEPS)]
    losses = _train(model, family, batches, dtype)
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _pipelined(rank, world, family, tp, pp, vp, m, sequence_parallel, dtype, distributed_optimizer=False,
               vocab_size=None, recompute="none"):
    from megacore.parallel import DistributedDataParallel, initialize_model_parallel
    from megacore.parallel.sharding import gather_full, param_shards

    dp = world // (tp * pp)
    extra = {"vocab_size": vocab_size} if vocab_size else {}
    extra["recompute"] = recompute
    ref_losses, ref_weights = _reference(family, m * dp, dtype, **extra)
    s = initialize_model_parallel(tp, pp)
    overrides = dict(tensor_parallel=tp > 1, sequence_parallel=sequence_parallel, **extra)
    model = pipeline.cut_stage(_build(family, **overrides), virtual_size=vp)
    batches = [_batches(family, m * dp, seed=step)[s.data_parallel_rank * m:(s.data_parallel_rank + 1) * m]
               for step in range(STEPS)]
    ddp = ((lambda mod: DistributedDataParallel(mod, grad_dtype=torch.float32, reduce_scatter=distributed_optimizer))
           if dp > 1 else None)
    losses = _train(model, family, batches, dtype, ddp, distributed_optimizer)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for (loss, norm), (ref_loss, ref_norm) in zip(losses, ref_losses):
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), **tol)
        assert (norm == "skipped") == (ref_norm == "skipped"), (losses, ref_losses)  # overflow agreed by every stage
        if norm != "skipped":
            torch.testing.assert_close(torch.tensor(norm), torch.tensor(ref_norm), **tol)
    if dtype == torch.float16:
        assert losses[0][1] == "skipped" and losses[-1][1] != "skipped", losses
    # Adam divides by the root of the squared gradient: elements whose gradient is ~0 amplify round-off
    weight_tol = dict(rtol=1e-4, atol=2e-4) if dtype == torch.float32 else tol
    for info in param_shards(model, tp):
        full = gather_full(info, info.param, s.tensor_parallel_group)
        torch.testing.assert_close(full.float(), ref_weights[info.name].float(), **weight_tol,
                                   msg=lambda m: f"rank {rank}: {info.name}: {m}")


LAYOUTS = {  # name: (world, tp, pp, vp, micro-batches per step)
    "pp2": (2, 1, 2, 1, 4),
    "pp4": (4, 1, 4, 1, 4),
    "pp2_vp2": (2, 1, 2, 2, 4),
    "pp2_fewer_microbatches_than_stages": (2, 1, 2, 1, 1),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gpt_pipeline_matches_one_process(name):
    world, tp, pp, vp, m = LAYOUTS[name]
    run_distributed(_pipelined, world, "gpt", tp, pp, vp, m, False, torch.float32, timeout_s=240)


def test_gpt_tp2_pp2_sequence_parallel_matches_one_process():
    run_distributed(_pipelined, 4, "gpt", 2, 2, 1, 2, True, torch.float32, timeout_s=240)


def test_gpt_pp2_dp2_matches_one_process():
    run_distributed(_pipelined, 4, "gpt", 1, 2, 1, 2, False, torch.float32, timeout_s=240)


def test_gpt_tp2_pp2_dp2_eight_processes_match_one_process():
    run_distributed(_pipelined, 8, "gpt", 2, 2, 1, 2, False, torch.float32, timeout_s=300)


def test_gpt_pp2_dp2_distributed_optimizer_matches_one_process():
    # a vocab large enough that the two stages' other parameters would slice the tied embedding's gradient
    # differently if it shared a bucket with them
    run_distributed(_pipelined, 4, "gpt", 1, 2, 1, 2, False, torch.float32, True, 6100, timeout_s=300)


def test_gpt_pp2_bf16_masters_match_one_process():
    run_distributed(_pipelined, 2, "gpt", 1, 2, 1, 2, False, torch.bfloat16, timeout_s=240)


def test_gpt_pp2_fp16_overflow_skips_on_every_stage_like_one_process():
    run_distributed(_pipelined, 2, "gpt", 1, 2, 1, 2, False, torch.float16, timeout_s=240)


def test_gpt_pp2_interleaved_with_full_recompute_matches_one_process():
    run_distributed(_pipelined, 2, "gpt", 1, 2, 2, 2, False, torch.float32, False, None, "full", timeout_s=240)


@pytest.mark.parametrize("family", ["bert", "electra"])
def test_encoders_pp2_match_one_process(family):
    run_distributed(_pipelined, 2, family, 1, 2, 1, 2, False, torch.float32, timeout_s=240)


def _record_order(rank, world, m, vp):
    from megacore.parallel import initialize_model_parallel

    initialize_model_parallel(1, world)
    model = pipeline.cut_stage(_build("gpt"), virtual_size=vp)
    record: list[Op] = []
    pipeline.forward_backward(model, _batches("gpt", m, 0), lambda loss: loss / m, record=record)
    assert record == schedule(m, world, rank, vp)
    dist.barrier()


def test_executor_runs_the_schedule_in_order():
    run_distributed(_record_order, 2, 4, 2, timeout_s=120)


def _eval_items(family: str) -> list[dict]:
    items = []
    for batch in _batches(family, 3, seed=7):
        for i in range(MICRO):
            item = {k: v[i] for k, v in batch.items()}
            if family == "gpt":
                item = {"tokens": item["input_ids"], "labels": item["labels"]}
            items.append(item)
    return items


def _evaluate(rank, world, family):
    from megacore.parallel import initialize_model_parallel
    from megacore.training.tasks import Task

    model = _build(family)
    task = Task.for_model(model)
    items = _eval_items(family)
    torch.manual_seed(5)
    reference = task.evaluate(model, items, MICRO, 3)
    initialize_model_parallel(1, world)
    stage = pipeline.cut_stage(_build(family))
    torch.manual_seed(5)
    got = task.evaluate_pipeline(stage, items, MICRO, 3)
    assert got.keys() == reference.keys()
    for key in got:
        assert got[key] == pytest.approx(reference[key], rel=1e-5), (key, got, reference)


@pytest.mark.parametrize("family", ["gpt", "bert", "electra"])
def test_pipeline_evaluation_matches_one_process(family):
    run_distributed(_evaluate, 2, family, timeout_s=120)
