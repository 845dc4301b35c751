"""Checkpoints at any parallel layout: saved at one (tensor, pipeline, data parallel, virtual pipeline, distributed
optimizer or not) layout and loaded at another, through real gloo processes.

The reference is one process training the same model on the same global batches (``_reference``, in the test
process). After loading, each rank's weights and AdamW state, merged over its tensor-parallel group, must equal
the checkpoint's files bit for bit and the reference's state to round-off; one more step must then give the
reference's next weights (which needs the right moments, step counts and per-group hyper-parameters).

Spawning processes costs more than the checks, so the saves run in one launch per world size and the loads at
two processes in one more (``_run_jobs``); each test asserts its own job's outcome, traceback included.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import megacore.training
from megacore.training.checkpoint import load_checkpoint, read_checkpoint_meta, resolve_checkpoint, save_checkpoint
from tests.parallel.utils import run_distributed

TINY = dict(vocab_size=61, hidden_size=32, num_layers=4, num_attention_heads=4, max_position_embeddings=16,
            hidden_dropout=0.0, attention_dropout=0.0)  # vocab 61: tensor-parallel padding is cut and restored
SEQ, ROWS, MICROBATCHES = 8, 2, 4  # global micro-batches per step, split over data-parallel ranks
SAVED_AT, LR = 2, 1e-2
HAS_DISTRIBUTED_OPTIMIZER = hasattr(megacore.training, "DistributedOptimizer")
needs_distributed_optimizer = pytest.mark.skipif(not HAS_DISTRIBUTED_OPTIMIZER,
                                                 reason="megacore.training.DistributedOptimizer is not on this branch")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    distributed_optimizer: bool = False
    dtype: str = "float32"

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _batches(step: int) -> list[dict]:
    """The global micro-batches of step ``step``."""
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(MICROBATCHES):
        ids = torch.randint(0, TINY["vocab_size"], (ROWS, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()})
    return out


def _setup(layout: Layout, seed: int, dropout: float = 0.0):
    """(trainer, bare model, optimizer, schedule) at ``layout`` (model parallel initialized by the caller)."""
    from megacore.models.registry import build
    from megacore.parallel import DistributedDataParallel, pipeline
    from megacore.training import LRSchedule, MixedPrecision, Trainer, build_optimizer

    torch.manual_seed(seed)
    model = build("gpt-tiny", **{**TINY, "hidden_dropout": dropout, "attention_dropout": dropout},
                  tensor_parallel=layout.tp > 1)
    if layout.pp > 1:
        pipeline.cut_stage(model, virtual_size=layout.vp)
    precision = MixedPrecision(model, getattr(torch, layout.dtype))
    ddp = None
    if layout.dp > 1 or layout.distributed_optimizer:
        zero1 = {"reduce_scatter": True} if layout.distributed_optimizer else {}
        ddp = DistributedDataParallel(model, grad_dtype=torch.float32, **zero1)
    if layout.distributed_optimizer:
        optimizer = precision = megacore.training.DistributedOptimizer(ddp, precision, lr=LR, weight_decay=0.1)
    else:
        optimizer = build_optimizer(precision, lr=LR, weight_decay=0.1)
    schedule = LRSchedule(optimizer, max_lr=LR, min_lr=LR / 10, warmup_steps=1, total_steps=8)
    trainer = Trainer(ddp or model, optimizer, schedule, precision=precision,
                      grad_accumulation=MICROBATCHES // layout.dp,
                      clip=0.5, ddp=ddp)
    return trainer, model, optimizer, schedule


def _dp_rank() -> int:
    from megacore.parallel import state

    return state.get_data_parallel_rank() if state.model_parallel_is_initialized() else 0


def _train(trainer, layout: Layout, steps) -> list[float]:
    m, r = MICROBATCHES // layout.dp, _dp_rank()
    return [trainer.train_step(_batches(step)[r * m:(r + 1) * m])["loss"] for step in steps]


def _full_state(model, optimizer) -> dict:
    """This rank's weights, fp32 masters and AdamW state by name, merged over the tensor-parallel group (a
    collective), as fp32 CPU tensors; the distributed optimizer's through full_state (over the DP group)."""
    from megacore.parallel import state
    from megacore.parallel.sharding import gather_full, param_shards

    tp = state.get_tensor_parallel_world_size() if state.model_parallel_is_initialized() else 1
    group = state.get_tensor_parallel_group() if tp > 1 else None
    if hasattr(optimizer, "full_state"):
        optimizer.wait_for_params()
        saved = optimizer.full_state()
        moments, masters = saved["state"], saved["master_params"]
    else:
        named = dict(_named_by_optimizer(optimizer))
        moments = {n: optimizer.state[p] for n, p in named.items()}
        masters = {n: p for n, p in named.items() if p is not dict(model.named_parameters())[n]}
    out = {"weights": {}, "masters": {}, "state": {}}
    for info in param_shards(model, tp):
        def full(t):
            return gather_full(info, t, group).float().cpu().clone()
        out["weights"][info.name] = full(info.param)
        if info.name in masters and info.param.dtype != torch.float32:
            out["masters"][info.name] = full(masters[info.name])
        entry = moments[info.name]
        out["state"][info.name] = {"exp_avg": full(entry["exp_avg"]), "exp_avg_sq": full(entry["exp_avg_sq"]),
                                   "step": float(entry["step"])}
    return out


def _named_by_optimizer(optimizer):
    """(name, optimizer parameter) of a build_optimizer AdamW: its groups' ``names``."""
    for group in optimizer.param_groups:
        yield from zip(group["names"], group["params"])


def _checkpoint_files(root: str) -> dict:
    """The weights, masters and AdamW state in a checkpoint's files, merged over its stages (test-side reading)."""
    step_dir = resolve_checkpoint(root)
    meta = json.load(open(os.path.join(step_dir, "meta.json")))
    out = {"weights": {}, "masters": {}, "state": {}}
    for stage in meta["stages"]:
        out["weights"].update(load_file(os.path.join(step_dir, stage["weights"])))
        saved = torch.load(os.path.join(step_dir, stage["optimizer"]), weights_only=True)
        out["masters"].update(saved["master_params"])
        out["state"].update(saved["state"])
    return out


def _reference(dtype: str) -> dict:
    """One process, fp32 or bf16 with fp32 masters: the state after SAVED_AT steps and the weights one step later."""
    layout = Layout(dtype=dtype)
    trainer, model, optimizer, _ = _setup(layout, seed=0)
    _train(trainer, layout, range(SAVED_AT))
    saved = _full_state(model, optimizer)
    _train(trainer, layout, [SAVED_AT])
    return {**saved, "next_weights": _full_state(model, optimizer)["weights"]}


def _one_process_model(**overrides):
    from megacore.models.registry import build

    return build("gpt-tiny", **{**TINY, **overrides})


def _train_and_save(rank, world, layout: Layout, root: str):
    from megacore.parallel import initialize_model_parallel

    if world > 1:
        initialize_model_parallel(layout.tp, layout.pp)
    trainer, model, optimizer, schedule = _setup(layout, seed=0)
    _train(trainer, layout, range(SAVED_AT))
    torch.manual_seed(1000 + rank)  # every rank's RNG state differs: which file a load takes is visible
    save_checkpoint(root, SAVED_AT, trainer.model, optimizer, extra={"schedule": schedule.state_dict()})
    # what was written is this run's state, bit for bit (its tied copy too: the first stage's entry)
    _assert_state(_full_state(model, optimizer), _checkpoint_files(root), True, "what was saved", rank, layout)


def _jobs(rank, world, jobs: list, out: str):
    """Runs each ``(name, fn, args)`` of ``jobs`` as ``fn(rank, world, *args)`` in turn, recording ("ok", its
    result) or ("error", traceback) in ``out/rank{rank}.pt`` after each (a later hang keeps what came before)."""
    from megacore.parallel import destroy_model_parallel

    results = {}
    for name, fn, args in jobs:
        try:
            results[name] = ("ok", fn(rank, world, *args))
        except Exception:  # noqa: BLE001 - reported by the test that asserts this job
            results[name] = ("error", traceback.format_exc())
        finally:
            destroy_model_parallel()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _run_jobs(world: int, jobs: list, out) -> dict:
    """``{job name: [("ok", result) | ("error", traceback), one per rank]}`` of ``jobs`` run in ``world``
    processes (one launch)."""
    os.makedirs(out, exist_ok=True)
    launch = None
    try:
        run_distributed(_jobs, world, jobs, str(out), timeout_s=120 + 60 * len(jobs))
    except AssertionError as e:  # a job that failed is reported with its own traceback; this is a hang
        launch = str(e)
    per_rank = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)
                if os.path.exists(os.path.join(out, f"rank{r}.pt")) else {} for r in range(world)]
    return {name: [results.get(name, ("error", f"did not finish: {launch}")) for results in per_rank]
            for name, _, _ in jobs}


def _outcome(results: dict, name: str) -> list:
    """The per-rank results of job ``name``; fails the test with a rank's traceback if it raised."""
    for rank, (status, value) in enumerate(results[name]):
        if status != "ok":
            pytest.fail(f"{name}, rank {rank}:\n{value}", pytrace=False)
    return [value for _, value in results[name]]


def _assert_near(got: dict, want: dict, layout: Layout, what: str, moment: bool = False):
    """``got`` equals ``want`` (tensors by name: one process's) to the round-off of training at another layout.
    fp32: element by element, relative to each tensor's scale for the moments (Adam divides by the root of the
    squared gradient: elements whose gradient is ~0 amplify round-off). bf16: the gradients themselves differ in
    their last bits between layouts, and Adam turns the noise of gradients that vanish in exact arithmetic (the
    key bias's: softmax ignores it) into steps of the learning rate, so single tensors differ by far more than
    round-off; all tensors are compared together (relative L2 distance: up to ~2% seen at TP2 x DP2), which a
    mistake of the checkpoint (a wrong shard, name or group) still moves by order one. The bit-for-bit
    comparisons with the files are the precise checks."""
    if layout.dtype == "float32":
        for name, t in got.items():
            w = want[name].float()
            tol = dict(rtol=1e-3, atol=1e-3 * float(w.abs().max())) if moment else dict(rtol=1e-4, atol=2e-4)
            torch.testing.assert_close(t, w, **tol, msg=lambda m: f"{what} {name}: {m}")
    else:
        names = sorted(got)
        g, w = (torch.cat([d[n].float().reshape(-1) for n in names]) for d in (got, want))
        distance = float((g - w).norm() / w.norm())
        assert distance < 5e-2, f"{what}: relative L2 distance {distance:.3g} from one process's"


def _assert_state(got: dict, want: dict, exact: bool, what: str, rank: int, layout: Layout):
    """``got`` (a _full_state) against ``want``: the files, bit for bit; else one process's (_assert_near)."""
    for name, entry in got["state"].items():
        assert entry["step"] == float(want["state"][name]["step"]) == SAVED_AT
    if exact:
        for kind in ("weights", "masters"):
            for name, t in got[kind].items():
                assert torch.equal(t, want[kind][name].float()), f"rank {rank}: {kind} {name} differs from {what}"
        for name, entry in got["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(entry[key], want["state"][name][key].float()), \
                    f"rank {rank}: {key} of {name} differs from {what}"
        return
    for kind in ("weights", "masters"):
        _assert_near(got[kind], want[kind], layout, f"rank {rank}: {kind}")
    for key in ("exp_avg", "exp_avg_sq"):
        _assert_near({n: e[key] for n, e in got["state"].items()}, {n: e[key] for n, e in want["state"].items()},
                     layout, f"rank {rank}: {key} of", moment=True)


def _load_and_check(rank, world, layout: Layout, root: str, reference: dict, rng_source: int):
    """Loads ``root`` at ``layout`` and checks it against the files and the reference; then one more step."""
    from megacore.parallel import initialize_model_parallel

    if world > 1:
        initialize_model_parallel(layout.tp, layout.pp)
    trainer, model, optimizer, schedule = _setup(layout, seed=5)  # other weights: the load must replace them
    extra = load_checkpoint(root, trainer.model, optimizer)
    step_dir = resolve_checkpoint(root)
    rng = torch.load(os.path.join(step_dir, f"rng_rank{rng_source}.pt"), weights_only=True)
    assert torch.equal(torch.get_rng_state(), rng["torch"]), f"rank {rank}: not rng_rank{rng_source}.pt's state"
    schedule.load_state_dict(extra["schedule"])
    got = _full_state(model, optimizer)
    assert got["weights"].keys() == {n for n, _ in model.named_parameters()}
    _assert_state(got, _checkpoint_files(root), True, "the checkpoint's files", rank, layout)
    _assert_state(got, reference, False, "the reference", rank, layout)
    _train(trainer, layout, [SAVED_AT])
    _assert_near(_full_state(model, optimizer)["weights"], reference["next_weights"], layout,
                 f"rank {rank}: one step after loading:")


SAVED_LAYOUTS = {  # name: layout, saved by the fixture `saved`
    "one_process": Layout(), "pp2": Layout(pp=2), "pp2_vp2": Layout(pp=2, vp=2), "tp2_pp2": Layout(tp=2, pp=2),
    "pp2_dp2": Layout(pp=2, dp=2), "one_process_bf16": Layout(dtype="bfloat16"),
    **({"zero1_dp2": Layout(dp=2, distributed_optimizer=True, dtype="bfloat16"),
        "tp2_zero1_dp2": Layout(tp=2, dp=2, distributed_optimizer=True, dtype="bfloat16")}
       if HAS_DISTRIBUTED_OPTIMIZER else {}),
}


@pytest.fixture(scope="module")
def references():
    return {"float32": _reference("float32"), "bfloat16": _reference("bfloat16")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """Every layout of SAVED_LAYOUTS trained and saved (one launch per world size), and the PP2 resume run.
    ``{"roots": {name: root}, "results": {job: per-rank outcomes}}``."""
    base = tmp_path_factory.mktemp("saved")
    roots = {name: str(base / name) for name in SAVED_LAYOUTS}
    results = {}
    for name, layout in SAVED_LAYOUTS.items():
        if layout.world == 1:
            try:
                results[name] = [("ok", _train_and_save(0, 1, layout, roots[name]))]
            except Exception:  # noqa: BLE001
                results[name] = [("error", traceback.format_exc())]
    for world in (2, 4):
        jobs = [(name, _train_and_save, (layout, roots[name])) for name, layout in SAVED_LAYOUTS.items()
                if layout.world == world]
        if world == 2:
            jobs.append(("resume_pp2", _resume_pp2, (str(base / "resume_pp2"),)))
        results.update(_run_jobs(world, jobs, base / f"results_world{world}"))
    return {"roots": roots, "results": results}


def _root(saved: dict, name: str) -> str:
    _outcome(saved["results"], name)
    return saved["roots"][name]


LOADS = {  # name: (saved checkpoint, layout it is loaded at, the rank whose RNG file each rank must take)
    "one_process -> pp2": ("one_process", Layout(pp=2), 0),
    "tp2_pp2 -> pp2": ("tp2_pp2", Layout(pp=2), 0),
    "pp2_vp2 -> pp2": ("pp2_vp2", Layout(pp=2), 0),
    "pp2_dp2 -> tp2": ("pp2_dp2", Layout(tp=2), 0),
    **({"one_process_bf16 -> zero1_dp2": ("one_process_bf16", Layout(dp=2, distributed_optimizer=True,
                                                                      dtype="bfloat16"), 0),
        "tp2_zero1_dp2 -> pp2_bf16": ("tp2_zero1_dp2", Layout(pp=2, dtype="bfloat16"), 0)}
       if HAS_DISTRIBUTED_OPTIMIZER else {}),
}


@pytest.fixture(scope="module")
def loaded(saved, references, tmp_path_factory) -> dict:
    """Every load of LOADS at two processes, in one launch: per-rank outcomes by name."""
    jobs = []
    for name, (source, layout, rng_source) in LOADS.items():
        if all(status == "ok" for status, _ in saved["results"][source]):
            jobs.append((name, _load_and_check, (layout, saved["roots"][source], references[layout.dtype], rng_source)))
    results = _run_jobs(2, jobs, tmp_path_factory.mktemp("loaded"))
    for name, (source, _, _) in LOADS.items():  # a load whose checkpoint was not saved fails with the save's error
        results.setdefault(name, saved["results"][source])
    return results


# ---- pipeline stages <-> one process ---------------------------------------------------------------------------


def test_pp2_writes_one_weights_and_one_optimizer_file_per_stage(saved):
    root = _root(saved, "pp2")
    step_dir = resolve_checkpoint(root)
    assert sorted(os.listdir(step_dir)) == ["extra.pt", "meta.json", "model-pp000.safetensors",
                                            "model-pp001.safetensors", "optimizer-pp000.pt", "optimizer-pp001.pt",
                                            "rng_rank0.pt", "rng_rank1.pt"]
    meta = read_checkpoint_meta(root)
    assert (meta["version"], meta["pipeline_parallel_size"], meta["tensor_parallel_size"]) == (2, 2, 1)
    assert (meta["virtual_pipeline_parallel_size"], meta["distributed_optimizer"]) == (1, False)
    stage0, stage1 = (set(load_file(os.path.join(step_dir, f"model-pp00{k}.safetensors"))) for k in (0, 1))
    assert not stage0 & stage1  # the last stage's tied copy of the word embedding is not written
    assert "embedding.word.weight" in stage0 and "final_norm.weight" in stage1
    assert {n for n in stage0 if ".layers." in n} == {n for n in meta["parameters"] if n.startswith((
        "decoder.layers.0.", "decoder.layers.1."))}
    for name, entry in meta["parameters"].items():
        assert entry["file"] == f"model-pp00{entry['stage']}.safetensors"
        assert entry["optimizer_file"] == f"optimizer-pp00{entry['stage']}.pt"
    assert meta["parameters"]["embedding.word.weight"]["shape"] == [TINY["vocab_size"], TINY["hidden_size"]]
    assert stage0 | stage1 == {n for n, _ in _one_process_model().named_parameters()}  # the whole model


def test_pp2_checkpoint_loads_in_one_process(saved, references):
    _load_and_check(0, 1, Layout(), _root(saved, "pp2"), references["float32"], rng_source=0)


def test_one_process_checkpoint_loads_at_pp2(loaded):
    _outcome(loaded, "one_process -> pp2")


# ---- across tensor, data and virtual pipeline parallelism ------------------------------------------------------


def test_tp2_pp2_checkpoint_loads_at_pp2(loaded):
    _outcome(loaded, "tp2_pp2 -> pp2")


def test_pp2_dp2_checkpoint_loads_at_tp2(saved, loaded):
    meta = read_checkpoint_meta(_root(saved, "pp2_dp2"))
    assert (meta["data_parallel_size"], meta["world_size"]) == (2, 4)
    assert sorted(f for f in os.listdir(meta["path"]) if f.startswith("rng")) == [f"rng_rank{r}.pt" for r in range(4)]
    _outcome(loaded, "pp2_dp2 -> tp2")


def test_interleaved_pp2_vp2_checkpoint_loads_at_pp2(saved, loaded):
    meta = read_checkpoint_meta(_root(saved, "pp2_vp2"))
    assert meta["virtual_pipeline_parallel_size"] == 2
    # rank 0 holds virtual stages 0 and 2: layers 0 and 2
    assert {n.split(".")[2] for n, e in meta["parameters"].items() if ".layers." in n and e["stage"] == 0} == {"0", "2"}
    _outcome(loaded, "pp2_vp2 -> pp2")


# ---- the distributed optimizer ------------------------------------------------------------------------------------


@needs_distributed_optimizer
def test_distributed_optimizer_dp2_checkpoint_loads_in_one_process(saved, references):
    root = _root(saved, "zero1_dp2")
    assert read_checkpoint_meta(root)["distributed_optimizer"] is True
    _load_and_check(0, 1, Layout(dtype="bfloat16"), root, references["bfloat16"], rng_source=0)


@needs_distributed_optimizer
def test_one_process_checkpoint_loads_into_the_distributed_optimizer_at_dp2(loaded):
    _outcome(loaded, "one_process_bf16 -> zero1_dp2")


@needs_distributed_optimizer
def test_distributed_optimizer_tp2_dp2_checkpoint_loads_at_pp2_with_fp32_masters(loaded):
    _outcome(loaded, "tp2_zero1_dp2 -> pp2_bf16")


# ---- resuming at the saving layout ---------------------------------------------------------------------------------


def _resume_pp2(rank, world, root: str) -> dict:
    """What the tests below check: 2 steps after saving vs. 2 steps after loading (and without restoring the
    RNG), a save refused for a NaN on one stage, one that finds the disk full on one stage, and keep_last."""
    from megacore.parallel import initialize_model_parallel

    layout = Layout(pp=2)
    initialize_model_parallel(1, 2)
    result = {}
    trainer, model, optimizer, schedule = _setup(layout, seed=0, dropout=0.1)  # dropout: the RNG state matters
    _train(trainer, layout, range(SAVED_AT))
    save_checkpoint(root, SAVED_AT, model, optimizer, extra={"schedule": schedule.state_dict()})
    result["uninterrupted"] = _train(trainer, layout, [2, 3])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for restore_rng in (True, False):
        trainer, model, optimizer, schedule = _setup(layout, seed=7, dropout=0.1)
        torch.manual_seed(12345)  # a fresh process's RNG
        extra = load_checkpoint(root, model, optimizer, restore_rng=restore_rng)
        schedule.load_state_dict(extra["schedule"])
        key = "resumed" if restore_rng else "resumed_without_rng"
        result[key] = _train(trainer, layout, [2, 3])
        result[key + "_same_weights"] = all(torch.equal(p, weights[n]) for n, p in model.named_parameters())

    nan_param = dict(model.named_parameters()).get("final_norm.weight")  # the last stage's
    if nan_param is not None:
        with torch.no_grad():
            nan_param[0] = float("nan")
    try:
        save_checkpoint(root, 9, model, optimizer)
    except ValueError as e:
        result["nan_error"] = str(e)
    if nan_param is not None:
        with torch.no_grad():
            nan_param[0] = 1.0

    import errno

    import safetensors.torch

    from megacore.training.checkpoint import CheckpointSaveError

    real = safetensors.torch.save_file
    if rank == 1:  # the last stage's writer finds the disk full
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        safetensors.torch.save_file = full_disk
    try:
        save_checkpoint(root, 8, model, optimizer)
    except CheckpointSaveError as e:
        result["disk_full_error"] = str(e)
    finally:
        safetensors.torch.save_file = real
    dist.barrier()
    result["listing_after_disk_full"] = sorted(os.listdir(root))
    for step in (4, 5):
        save_checkpoint(root, step, model, optimizer, keep_last=2)
    dist.barrier()
    result["listing"] = sorted(os.listdir(root))
    return result


def test_pp2_resumes_bit_for_bit_at_the_saving_layout(saved):
    for rank, result in enumerate(_outcome(saved["results"], "resume_pp2")):
        assert result["resumed"] == result["uninterrupted"], rank  # losses, exactly
        assert result["resumed_same_weights"], rank
        # the test is sensitive to the RNG: dropout draws differently from another state
        assert result["resumed_without_rng"] != result["uninterrupted"], rank


def test_pp2_save_refuses_non_finite_weights_on_any_stage_and_keep_last_prunes(saved):
    first, last = _outcome(saved["results"], "resume_pp2")
    assert "refusing to save step 9: parameter final_norm.weight has 1 non-finite values" in last["nan_error"]
    assert "refusing to save step 9: another pipeline stage has non-finite weights" in first["nan_error"]
    assert first["listing"] == last["listing"] == ["latest", "step_00000004", "step_00000005"]


def test_a_full_disk_on_one_stage_fails_the_save_on_every_rank_and_leaves_nothing(saved):
    first, last = _outcome(saved["results"], "resume_pp2")
    assert last["disk_full_error"].startswith("checkpoint step 8: no space left on device")
    assert first["disk_full_error"] == "checkpoint step 8: another rank failed to write its part; nothing was saved"
    assert first["listing_after_disk_full"] == ["latest", "step_00000002"]  # no .tmp-step_00000008


# ---- format 1, errors, masters ----------------------------------------------------------------------------------


def _one_process_trained(tmp_path, **overrides):
    """A one-process model and plain AdamW after one step, saved at step 1 under ``tmp_path``; (model, optimizer)."""
    from megacore.models.registry import build
    from megacore.training import build_optimizer

    torch.manual_seed(0)
    model = build("gpt-tiny", **{**TINY, **overrides})
    optimizer = build_optimizer(model, lr=LR)
    batch = _batches(0)[0]
    model(batch["input_ids"], labels=batch["labels"]).mean().backward()
    optimizer.step()
    save_checkpoint(tmp_path, 1, model, optimizer)
    return model, optimizer


def _stage(stage: int, seed: int = 3, **overrides):
    """Pipeline stage ``stage`` of 2 of a fresh model, in this process (no model parallel)."""
    from megacore.models.registry import build
    from megacore.parallel import pipeline

    torch.manual_seed(seed)
    return pipeline.cut_stage(build("gpt-tiny", **{**TINY, **overrides}), stage, 2)


def test_a_format_1_checkpoint_loads_into_pipeline_stages(tmp_path):
    from megacore.training import build_optimizer

    _one_process_trained(tmp_path)
    step_dir = resolve_checkpoint(tmp_path)
    meta = json.load(open(os.path.join(step_dir, "meta.json")))
    # what format 1 wrote (model.safetensors and optimizer.pt: one stage's names in format 2 too)
    v1 = {"format": meta["format"], "version": 1, "step": meta["step"], "world_size": 1, "tensor_parallel_size": 1,
          "data_parallel_size": 1, "model": meta["model"], "optimizer": meta["optimizer"],
          "parameters": {n: {k: e[k] for k in ("shape", "dtype", "partition_dim", "vocab_size")}
                         for n, e in meta["parameters"].items()}}
    json.dump(v1, open(os.path.join(step_dir, "meta.json"), "w"))
    weights = load_file(os.path.join(step_dir, "model.safetensors"))
    saved = torch.load(os.path.join(step_dir, "optimizer.pt"), weights_only=True)
    for stage in (0, 1):
        model = _stage(stage)
        optimizer = build_optimizer(model, lr=LR)
        assert load_checkpoint(tmp_path, model, optimizer)["step"] == 1
        for name, p in model.named_parameters():  # stage 1: its tied copy of the word embedding too
            assert torch.equal(p, weights[name]), name
        for name, p in _named_by_optimizer(optimizer):
            assert torch.equal(optimizer.state[p]["exp_avg"], saved["state"][name]["exp_avg"]), name


def test_missing_names_and_wrong_shapes_are_errors_naming_the_function_and_the_parameter(tmp_path):
    from megacore.training import build_optimizer

    model, _ = _one_process_trained(tmp_path)
    with pytest.raises(ValueError, match=r"load_checkpoint: .* does not match the model \(GPTModel\): missing "
                                         r"\['decoder\.layers\.4\.[^]]*"):
        load_checkpoint(tmp_path, _stage(1, num_layers=8))  # layers 4..7: not in the checkpoint
    with pytest.raises(ValueError, match=r"load_checkpoint: parameter \S+ has shape \[.*\] in the checkpoint; the "
                                         r"model's parameter is \[.*64"):
        load_checkpoint(tmp_path, _stage(1, hidden_size=64, ffn_hidden_size=256))
    with pytest.raises(ValueError, match=r"load_checkpoint: .* does not match the model .*unexpected "
                                         r"\['decoder\.layers"):
        load_checkpoint(tmp_path, _one_process_model(num_layers=2))

    # an optimizer over a parameter the saved optimizer did not hold
    frozen = [p for n, p in model.named_parameters() if not n.startswith("final_norm.")]
    save_checkpoint(tmp_path / "frozen", 1, model, torch.optim.AdamW(frozen))
    with pytest.raises(ValueError, match=r"load_checkpoint: .* has no optimizer state for \['final_norm\.weight', "
                                         r"'final_norm\.bias'\]"):
        other = _stage(1)
        load_checkpoint(tmp_path / "frozen", other, build_optimizer(other, lr=LR))

    with pytest.raises(ValueError, match=r"save_checkpoint: the model is pipeline stage 0 of 2 \(cut_stage\) but model "
                                         "parallel is not initialized"):
        save_checkpoint(tmp_path / "stage", 1, _stage(0))


def test_masters_take_the_saved_fp32_weights_when_the_checkpoint_has_no_masters(tmp_path):
    from megacore.training import MixedPrecision, build_optimizer

    model, _ = _one_process_trained(tmp_path)  # fp32: no master_params
    other = _one_process_model()
    precision = MixedPrecision(other, torch.bfloat16)
    optimizer = build_optimizer(precision, lr=LR)
    load_checkpoint(tmp_path, other, optimizer)
    for (name, master), (_, p) in zip(precision.named_parameters(), model.named_parameters()):
        assert torch.equal(master, p), name  # the fp32 values, not the bf16 weights widened
    assert dict(other.named_parameters())["final_norm.weight"].dtype == torch.bfloat16
