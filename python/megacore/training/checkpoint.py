"""Training checkpoints: full (unsharded) weights and optimizer state, loadable at any parallel layout.

Layout under a checkpoint root (format version 2)::

    <root>/step_00001000/model-pp{k:03d}.safetensors  pipeline stage k's parameters by full-model name, FULL
                                                   (shards merged over the TP group, vocab tables cut to the
                                                   vocab size), model dtype; a tied copy (the last stage's
                                                   word embedding) is not written: the first stage's is
    <root>/step_00001000/optimizer-pp{k:03d}.pt     stage k's param_groups (parameter names, hyper-parameters),
                                                   its parameters' optimizer state by name, merged like the
                                                   weights (AdamW's exp_avg / exp_avg_sq have the full
                                                   parameter's shape), and ``master_params``: the fp32 masters
                                                   of half-precision weights (MixedPrecision, the distributed
                                                   optimizer), full as well
    <root>/step_00001000/extra.pt                  the caller's ``extra``: scheduler, loss scaler, data position
    <root>/step_00001000/rng_rank{r}.pt            RNG states of global rank r (torch CPU/CUDA, numpy, python)
    <root>/step_00001000/meta.json                 format, step, the saving layout (tensor-, pipeline- and
                                                   data-parallel sizes, virtual pipeline size, distributed
                                                   optimizer or not), every parameter's full shape, dtype,
                                                   stage and the files holding its weights and its state
    <root>/latest                                  the name of the newest complete step directory

Without pipeline parallelism the one stage's files are ``model.safetensors`` and ``optimizer.pt``, the names
of format version 1 (one file of every parameter), which is still read.

Saving: the data-parallel-rank-0 replica of each stage gathers its shards (a collective within each TP
group; the distributed optimizer first gathers its state over the DP group), and each stage's writer
(tensor- and data-parallel rank 0 of the stage) writes that stage's two files, in parallel with the other
stages' writers; every rank writes its RNG file. A save is atomic: everything is written into
``<root>/.tmp-step_...`` (files fsynced); once every rank has reported success, rank 0 writes meta.json,
renames the directory to its final name and replaces ``latest`` (atomically) last; a process killed at any
point leaves the previous checkpoint loadable.

Loading works at any layout: each rank reads only the tensors of the parameters it holds (from whichever
stage's file meta.json names), takes its tensor-parallel shard of them (``shard_of``: vocab tables padded
with zero rows to the model's padded vocab), fills a tied copy from the first stage's entry, and loads the
optimizer state the same way into a plain torch optimizer, fp32 masters (MixedPrecision) or the distributed
optimizer (``load_full_state``), whatever the saving layout and optimizer were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megacore._files import PathLike, atomic_write_text, umask
from megacore.parallel import pipeline, state
from megacore.parallel.sharding import ParamShard, gather_full, param_shards, shard_of
from megacore.parallel.timeouts import barrier

FORMAT = "megacore-checkpoint"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"  # the weights file without pipeline parallelism (and in format version 1)
OPTIMIZER_NAME = "optimizer.pt"
EXTRA_NAME = "extra.pt"
META_NAME = "meta.json"
LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RESERVED = re.compile(r"^(model-pp\d+\.safetensors|optimizer-pp\d+\.pt|rng_rank\d+\.pt)$")
# AdamW settings that say how a step is computed, not what it computes: a loaded optimizer keeps its own.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def step_directory_name(step: int) -> str:
    """``step_00001000`` for step 1000 (zero-padded to 8 digits so names sort by step)."""
    return f"step_{step:08d}"


def stage_file_names(stage: int, pipeline_size: int) -> tuple[str, str]:
    """(weights file, optimizer file) of pipeline stage ``stage`` of ``pipeline_size``:
    ``model-pp{stage:03d}.safetensors`` and ``optimizer-pp{stage:03d}.pt``; ``model.safetensors`` and
    ``optimizer.pt`` when there is one stage."""
    if pipeline_size == 1:
        return WEIGHTS_NAME, OPTIMIZER_NAME
    return f"model-pp{stage:03d}.safetensors", f"optimizer-pp{stage:03d}.pt"


# --------------------------------------------------------------------------------------------------------
# Where this process sits: its ranks and its part of the model


@dataclass(frozen=True)
class _Place:
    """This process's place in the parallel grid, and whether its model is one pipeline stage."""

    rank: int
    world_size: int
    tp_group: Optional[dist.ProcessGroup]
    tp_rank: int
    tp: int
    dp_rank: int
    dp: int
    pp_rank: int
    pp: int
    virtual: int  # the model's virtual pipeline chunks (1 when not cut)
    cut: bool  # the model is one stage of several (megacore.parallel.pipeline.cut_stage)


def _place(model: nn.Module, fn: str) -> _Place:
    """Raises ValueError when the model is a pipeline stage other than this process's pipeline rank."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    group, tp_rank, tp, dp_rank, dp, pp_rank, pp = None, 0, 1, 0, world_size, 0, 1
    if state.model_parallel_is_initialized():
        s = state.get_parallel_state()
        group, tp_rank, tp = s.tensor_parallel_group, s.tensor_parallel_rank, s.tensor_parallel_size
        dp_rank, dp = s.data_parallel_rank, s.data_parallel_size
        pp_rank, pp = s.pipeline_parallel_rank, s.pipeline_parallel_size
    stages = pipeline.layout_of(model)
    cut = stages is not None and stages.size > 1
    if cut and state.model_parallel_is_initialized() and (stages.rank, stages.size) != (pp_rank, pp):
        raise ValueError(f"megacore.training.{fn}: the model is pipeline stage {stages.rank} of {stages.size} "
                         f"(cut_stage), but this process is pipeline-parallel rank {pp_rank} of {pp}")
    return _Place(rank, world_size, group, tp_rank, tp, dp_rank, dp, pp_rank, pp,
                  stages.virtual_size if stages is not None else 1, cut)


def _gather(info: ParamShard, t: torch.Tensor, group) -> torch.Tensor:
    """The full, unpadded tensor of ``t`` (this rank's piece of ``info``'s parameter, or a tensor of its
    shape: an optimizer moment) as a CPU copy. A collective over the TP group for a sharded parameter."""
    return gather_full(info, t, group).to("cpu", copy=True).contiguous()


def _shard(info: ParamShard, full: torch.Tensor, rank: int, what: str, fn: str) -> torch.Tensor:
    """This rank's piece of a full, unpadded tensor read from a checkpoint; ValueError naming ``what`` when
    its shape is not the parameter's full shape."""
    t = shard_of(info, full, rank)
    if t is None:
        raise ValueError(f"megacore.training.{fn}: {what} has shape {list(full.shape)} in the checkpoint; the model's "
                         f"parameter is {info.full_shape()} (this rank's shard {list(info.param.shape)} of "
                         f"tensor-parallel size {info.world})")
    return t


# --------------------------------------------------------------------------------------------------------
# Optimizer: which optimizer parameter is which model parameter


def _optimizer_params(optimizer: torch.optim.Optimizer, params: list[ParamShard], fn: str) -> list[list[tuple[ParamShard, torch.Tensor]]]:
    """Per param group, (model parameter, optimizer parameter) pairs. The optimizer's parameters are the
    model's own; or fp32 master weights that name their model parameter (``master.model_param``, as
    ``MixedPrecision`` sets it); or one copy per model parameter of the same shape, in
    ``model.named_parameters()`` order."""
    by_id = {id(info.param): info for info in params}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    if all(id(p) in by_id for p in flat):
        match = {id(p): by_id[id(p)] for p in flat}
    elif all(id(getattr(p, "model_param", None)) in by_id for p in flat):  # MixedPrecision's fp32 masters
        match = {id(p): by_id[id(p.model_param)] for p in flat}
    elif len(flat) == len(params) and all(p.shape == info.param.shape for p, info in zip(flat, params)):
        match = {id(p): info for p, info in zip(flat, params)}
    else:
        raise ValueError(f"megacore.training.{fn}: the optimizer's {len(flat)} parameters are neither the model's "
                         f"parameters nor one copy of each of its {len(params)} parameters in order")
    if len({id(info.param) for info in match.values()}) != len(flat):
        raise ValueError(f"megacore.training.{fn}: the optimizer holds a model parameter twice")
    return [[(match[id(p)], p) for p in group["params"]] for group in optimizer.param_groups]


def _is_distributed_optimizer(optimizer) -> bool:
    """The distributed optimizer (megacore.training.DistributedOptimizer) keeps 1/DP of the state per rank and
    hands it over whole through ``full_state`` / ``load_full_state`` (collectives over the DP group)."""
    return hasattr(optimizer, "full_state") and hasattr(optimizer, "load_full_state")


def _hyper_parameters(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "names") + _IMPLEMENTATION_KEYS}


def _local_optimizer_state(optimizer, params: list[ParamShard], fn: str) -> dict:
    """A torch optimizer's state in ``full_state``'s form: {"param_groups": [{hyper-parameters, "params":
    names}], "state": {name: {key: value}}, "master_params": {name: fp32 master}}, tensors of this rank's
    (tensor-parallel shard's) shapes, not copied."""
    groups, states, masters = [], {}, {}
    for g, members in zip(optimizer.param_groups, _optimizer_params(optimizer, params, fn)):
        groups.append({**{k: v for k, v in g.items() if k not in ("params", "names")},
                       "params": [info.name for info, _ in members]})
        for info, p in members:
            states[info.name] = dict(optimizer.state.get(p, {}))
            if p is not info.param:  # an fp32 master copy: its values are not the (half precision) model's
                masters[info.name] = p
    return {"param_groups": groups, "state": states, "master_params": masters}


def _gather_optimizer_state(local: dict, params: list[ParamShard], skip: frozenset, group, optimizer) -> dict:
    """``local`` (``full_state``'s form, this rank's shapes) with every tensor shaped like its parameter
    merged over the tensor-parallel group (a collective: every TP rank calls it, in the same order), as CPU
    copies; the parameters in ``skip`` (tied copies) left out."""
    info_of = {info.name: info for info in params}
    states, masters = {}, {}
    for info in params:
        if info.name in skip:
            continue
        entry = {}
        for key in sorted(local["state"].get(info.name, {})):
            value = local["state"][info.name][key]
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(info.param.shape):
                entry[key] = _gather(info, value, group)  # a moment: sharded like the parameter
            else:
                entry[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        if entry:
            states[info.name] = entry
        if info.name in local["master_params"]:
            masters[info.name] = _gather(info_of[info.name], local["master_params"][info.name], group)
    groups = [{**_hyper_parameters(g), **{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g},
               "params": [n for n in g["params"] if n not in skip]} for g in local["param_groups"]]
    return {"format": FORMAT, "optimizer_class": type(optimizer).__name__, "param_groups": groups, "state": states,
            "master_params": masters}


def _same(a: dict, b: dict) -> bool:
    def plain(d):
        return {k: v.tolist() if torch.is_tensor(v) else v for k, v in d.items()}
    return plain(a) == plain(b)


def _regroup(saved_groups: list[dict], group_names: list[list[str]], current: list[dict], path: str,
             fn: str) -> list[dict]:
    """This optimizer's parameter groups (``group_names``: the names in each) with the hyper-parameters of
    the saved groups that held those names, whatever the saving layout's grouping was (each stage saves its
    own groups). An empty group keeps its current hyper-parameters. ValueError when the checkpoint has no
    group holding a name, or one group's names come from saved groups whose hyper-parameters differ."""
    holder = {name: g for g in saved_groups for name in g["params"]}
    out = []
    for gi, (names, group) in enumerate(zip(group_names, current)):
        absent = [n for n in names if n not in holder]
        if absent:
            raise ValueError(f"megacore.training.{fn}: {path} has no optimizer state for {absent} (in parameter "
                             f"group {gi} of the optimizer)")
        hyper = _hyper_parameters(holder[names[0]]) if names else _hyper_parameters(group)
        for n in names[1:]:
            if not _same(_hyper_parameters(holder[n]), hyper):
                raise ValueError(f"megacore.training.{fn}: parameter group {gi} of the optimizer holds {names[0]} and "
                                 f"{n}, which {path} kept in groups with different hyper-parameters "
                                 f"({hyper} and {_hyper_parameters(holder[n])}); group them as the saving run did")
        out.append({**hyper, "params": list(names)})
    return out


def _read_optimizer_files(path: str, meta: dict, names: list[str], fn: str) -> dict:
    """The saved optimizer state of ``names`` (full tensors), merged from the files meta.json names for them."""
    if meta.get("optimizer") is None:
        raise FileNotFoundError(f"megacore.training.{fn}: an optimizer was given but {path} was saved without "
                                "one")
    entries = meta["parameters"]
    files = sorted({entries[n].get("optimizer_file", OPTIMIZER_NAME) for n in names if n in entries})
    merged: dict[str, Any] = {"param_groups": [], "state": {}, "master_params": {}}
    for file in files:
        # mmap: a rank reads only the tensors it takes its shard of, not the whole stage's state
        saved = _read(os.path.join(path, file), "optimizer state", fn,
                      lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        merged["param_groups"] += saved["param_groups"]
        merged["state"].update(saved["state"])
        merged["master_params"].update(saved.get("master_params") or {})
    return merged


def _load_optimizer(optimizer, params: list[ParamShard], weights: dict[str, torch.Tensor], path: str, meta: dict,
                    tp_rank: int, fn: str) -> None:
    """Loads the saved state of this rank's parameters into ``optimizer``: moments and masters split for
    this tensor-parallel rank; a master the checkpoint lacks (saved without one: an fp32 run) is the
    checkpoint's weight (``weights``: this rank's shards, as read)."""
    distributed = _is_distributed_optimizer(optimizer)
    if distributed:
        # every rank's param_groups list only the pieces it holds; the groups' names are the same everywhere
        group_names = optimizer.group_names
    else:
        pairs = _optimizer_params(optimizer, params, fn)
        group_names = [[info.name for info, _ in members] for members in pairs]
    names = [n for group in group_names for n in group]
    saved = _read_optimizer_files(path, meta, names, fn)
    groups = _regroup(saved["param_groups"], group_names, optimizer.param_groups, path, fn)
    info_of = {info.name: info for info in params}
    states, masters = {}, {}
    for name in names:
        info = info_of[name]
        entry = {}
        for key, value in saved["state"].get(name, {}).items():
            if torch.is_tensor(value):  # a copy: the file is memory-mapped, and the optimizer keeps what it is given
                value = (_shard(info, value, tp_rank, f"optimizer state {key!r} of {name}", fn) if value.dim() > 0
                         else value).clone()
            entry[key] = value
        if entry:
            states[name] = entry
        master = saved["master_params"].get(name)
        masters[name] = (weights[name] if master is None
                         else _shard(info, master, tp_rank, f"master weight {name}", fn)).to(torch.float32)
    if distributed:
        optimizer.load_full_state({"param_groups": groups, "state": states, "master_params": masters}, fn)
        return
    state_dict: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for group, current, members in zip(groups, optimizer.param_groups, pairs):
        loaded = {**group, **{k: current[k] for k in _IMPLEMENTATION_KEYS if k in current},
                  "params": list(range(index, index + len(members)))}
        if "names" in current:
            loaded["names"] = current["names"]
        state_dict["param_groups"].append(loaded)
        for info, p in members:
            if info.name in states:
                state_dict["state"][index] = states[info.name]
            if p is not info.param:
                with torch.no_grad():
                    p.copy_(masters[info.name])
            index += 1
    optimizer.load_state_dict(state_dict)


# --------------------------------------------------------------------------------------------------------
# RNG states


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        # one state per device the saving process saw; a process that sees fewer devices sets those it has
        for device, cuda_state in zip(range(torch.cuda.device_count()), rng["cuda"]):
            torch.cuda.set_rng_state(cuda_state, device)
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------------
# Files


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _check_loadable(value, where: str, fn: str) -> None:
    """TypeError naming the key path of the first object ``torch.load(weights_only=True)`` would refuse."""
    if torch.is_tensor(value) or isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_loadable(item, f"{where}[{i}]", fn)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_loadable(key, f"{where} key {key!r}", fn)
            _check_loadable(item, f"{where}[{key!r}]", fn)
        return
    raise TypeError(f"megacore.training.{fn}: {where} is a {type(value).__name__}; a checkpoint holds tensors, "
                    "numbers, strings, None, and lists, tuples and dicts of them (pass state_dict()s, and configs "
                    "as dicts)")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: str) -> None:
    torch.save(obj, path)
    _fsync(path)


def _all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a barrier that also carries the verdict), so that a failure on
    one rank stops all of them instead of leaving the others waiting for it."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    # Rank 0 may write for longer than a collective may wait (big files, slow disks): meet first in a barrier
    # with its own, long bound (megacore.parallel.timeouts.barrier), then agree in a quick all-reduce.
    barrier("megacore.training.save_checkpoint: waiting for every rank to write its part")
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gather_on_rank_0(obj) -> Optional[list]:
    """Every rank's ``obj`` (picklable), in rank order, on global rank 0; None on the others. Call it where
    the ranks have just met (after ``_all_ok``), so that the collective's timeout is not a bound on work."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (no space, no permission, an I/O error). Nothing of it is left
    on disk, and ``latest`` and the earlier checkpoints are untouched. ``errno`` is the cause's."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]"
        return self.strerror or super().__str__()


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete step directory under ``root`` (holding meta.json), by step."""
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META_NAME)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def _prune(root: str, keep_last: int, keep: str) -> None:
    dirs = [path for _, path in _step_dirs(root)]
    for path in dirs[: max(0, len(dirs) - keep_last)]:
        if os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(directory: PathLike) -> list[str]:
    """Removes what killed or failed saves left under the checkpoint root ``directory`` (``.tmp-*``
    directories: never a complete checkpoint); returns their paths. Call it from one rank, when no save
    is running (a training run does at start-up, so that a full disk is freed before anything is written)."""
    root = os.fspath(directory)
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isdir(path):
                    os.remove(path)
                else:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _megabytes(n: int) -> str:
    return f"{max(1, round(n / 2**20)):,} MB"


def _disk_error(e: OSError, step: int, needed: int, root: str) -> CheckpointSaveError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
        reason = f"no space left on device (needed ~{_megabytes(needed)}, {_megabytes(free)} free in {root})"
    else:
        reason = (e.strerror or str(e)) + (f": {e.filename}" if getattr(e, "filename", None) else "")
    return CheckpointSaveError(e.errno or errno.EIO, f"checkpoint step {step}: {reason}")


def _publish(root: str, tmp: str, final: str, name: str, overwrite: bool) -> None:
    """Renames the finished ``tmp`` to ``final`` and points ``latest`` at it (rank 0)."""
    if os.path.exists(final):  # saving a step again (overwrite=True): the old one goes only once the new is in place
        old = os.path.join(root, TMP_PREFIX + "old-" + name)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    atomic_write_text(os.path.join(root, LATEST_NAME), name + "\n")
    _fsync(root)


def _check_finite(weights: dict, step: int, fn: str) -> None:
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"megacore.training.{fn}: refusing to save step {step}: parameter {name} has {bad} "
                             "non-finite values (NaN or inf); the run diverged")


def save_checkpoint(directory: PathLike, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict] = None, keep_last: Optional[int] = None,
                    files: Optional[dict[str, PathLike]] = None, overwrite: bool = False) -> str:
    """Saves ``model`` (and ``optimizer``, ``extra``) as ``<directory>/step_{step:08d}`` and points
    ``<directory>/latest`` at it; returns that step directory's path.

    Args:
        directory: the checkpoint root (created if missing).
        step: the training step (int >= 0).
        model: a megacore model (or any module; a DistributedDataParallel wrapper is fine), whole or one
            pipeline stage (``megacore.parallel.pipeline.cut_stage``). Sharded parameters (as their modules declare,
            ``megacore.parallel.sharding``) are all-gathered over the tensor-parallel group.
        optimizer: a torch optimizer over the model's parameters, or over fp32 master copies of them (one per
            parameter, same shapes, in ``named_parameters()`` order; their values are saved too), or the
            distributed optimizer (``megacore.training.DistributedOptimizer``: its state is gathered over the
            data-parallel group).
        extra: anything else to resume (scheduler and loss-scaler ``state_dict()``s, consumed samples, the config
            as a dict): tensors, numbers, strings, None, lists, tuples and dicts of them (``torch.load``'s
            ``weights_only`` types), returned by :func:`load_checkpoint`.
        keep_last: after a successful save, delete all but the newest ``keep_last`` step directories (>= 1).
        files: ``{name: path}`` of files or directories copied into the step directory under ``name`` (e.g.
            the tokenizer, so that the checkpoint is self-contained).
        overwrite: replace a complete checkpoint of the same step; by default that is refused
            (FileExistsError), so a complete checkpoint is never lost to a later save.

    Under torch.distributed every rank must call it: the data-parallel-rank-0 replica of each pipeline stage
    gathers its shards, the stage's writer (its tensor- and data-parallel rank 0) writes the stage's files,
    global rank 0 the rest, every rank its own RNG state; all ranks return once the checkpoint is complete (the
    root must be on a file system every rank sees).

    Failures leave nothing behind: weights with a NaN or inf are refused (ValueError) before anything is
    written; an estimated size larger than the free space, or any error while writing (a full disk, no
    permission), raises CheckpointSaveError (an OSError, ``"checkpoint step N: no space left on device (needed
    ~X MB, ...)"``) on every rank, after the partial step directory is removed; ``latest`` and the earlier
    checkpoints are untouched. Raises ValueError/TypeError for bad arguments, and ValueError for a model that is
    not cut into this process's pipeline stage under pipeline parallelism.
    """
    fn = "save_checkpoint"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"megacore.training.{fn}: step={step!r} must be an int >= 0")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"megacore.training.{fn}: keep_last={keep_last!r} must be None or an int >= 1")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"megacore.training.{fn}: extra must be a dict or None, got {type(extra).__name__}")
    _check_loadable(extra, "extra", fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"megacore.training.{fn}: model must be an nn.Module, got {type(model).__name__}")
    for key, src in (files or {}).items():
        if (key in (WEIGHTS_NAME, OPTIMIZER_NAME, EXTRA_NAME, META_NAME) or _RESERVED.match(key) or "/" in key
                or key.startswith(".") or not key):
            raise ValueError(f"megacore.training.{fn}: files key {key!r} is not a plain name of its own")
        if not os.path.exists(src):
            raise FileNotFoundError(f"megacore.training.{fn}: files[{key!r}] = {src} does not exist")
    from safetensors.torch import save_file

    root = os.path.abspath(os.fspath(directory))
    where = _place(model, fn)
    stages = pipeline.layout_of(model)
    if where.pp > 1 and not where.cut:
        raise ValueError(f"megacore.training.{fn}: pipeline_parallel_size={where.pp} but the model is not cut into "
                         "pipeline stages (megacore.parallel.pipeline.cut_stage)")
    if where.cut and where.pp == 1:
        raise ValueError(f"megacore.training.{fn}: the model is pipeline stage {stages.rank} of {stages.size} "
                         "(cut_stage) but model parallel is not initialized with that pipeline size; a checkpoint "
                         "holds every stage")
    rank, group = where.rank, where.tp_group
    params = param_shards(model, where.tp)
    copies = pipeline.tied_copy_names(model)  # the first stage saves these
    weights_file, optimizer_file = stage_file_names(where.pp_rank, where.pp)
    name = step_directory_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    if not overwrite and os.path.isfile(os.path.join(final, META_NAME)):
        raise FileExistsError(f"megacore.training.{fn}: {final} is a complete checkpoint; refusing to overwrite it "
                              "(pass overwrite=True to replace it)")

    distributed_optimizer = optimizer is not None and _is_distributed_optimizer(optimizer)
    local_state = None
    if distributed_optimizer:
        optimizer.wait_for_params()  # the parameters are written by all-gathers that may still be in flight
        local_state = optimizer.full_state(fn)  # a collective over the data-parallel group
        # an fp32 model's masters are its weights: not saved twice (loading takes the weights)
        dtype_of = {info.name: info.param.dtype for info in params}
        local_state["master_params"] = {n: t for n, t in local_state["master_params"].items()
                                        if dtype_of.get(n) != torch.float32}
    weights = optimizer_state = None
    if where.dp_rank == 0:  # one replica of each stage gathers (a collective within each of its TP groups)
        weights = {info.name: _gather(info, info.param, group) for info in params if info.name not in copies}
        if optimizer is not None:
            if local_state is None:
                local_state = _local_optimizer_state(optimizer, params, fn)
            optimizer_state = _gather_optimizer_state(local_state, params, copies, group, optimizer)
    local_state = None
    writer = where.dp_rank == 0 and where.tp_rank == 0
    if not writer:  # the other tensor-parallel ranks took part in the gathers only
        weights = optimizer_state = None
    problem: Optional[BaseException] = None
    if writer:
        try:
            _check_finite(weights, step, fn)
        except ValueError as e:
            problem = e
    if not _all_ok(problem is None):
        raise problem or ValueError(f"megacore.training.{fn}: refusing to save step {step}: another pipeline "
                                    "stage has non-finite weights (NaN or inf); the run diverged")

    # What each stage's writer holds, for meta.json; the ranks have just met, so this collective waits for none.
    stage_meta = None
    if writer:
        stage_meta = {
            "stage": where.pp_rank, "bytes": _nbytes(weights) + _nbytes(optimizer_state),
            "parameters": {info.name: {"shape": info.full_shape(), "dtype": str(info.param.dtype).replace("torch.", ""),
                                       "partition_dim": info.dim,
                                       "vocab_size": info.vocab_size, "stage": where.pp_rank, "file": weights_file,
                                       "optimizer_file": optimizer_file if optimizer_state is not None else None}
                           for info in params if info.name not in copies},
        }
    stage_metas = _gather_on_rank_0(stage_meta)

    try:
        needed = 0
        if rank == 0:
            stage_metas = sorted((m for m in stage_metas if m is not None), key=lambda m: m["stage"])
            needed = sum(m["bytes"] for m in stage_metas) + _nbytes(extra) + (1 << 20)
            os.makedirs(root, exist_ok=True)
            remove_stale_temporaries(root)  # left by a save that was killed
            free = shutil.disk_usage(root).free
            if needed > free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.makedirs(tmp)
    except OSError as e:
        problem = _disk_error(e, step, needed, root)
    if not _all_ok(problem is None):  # the tmp directory exists
        raise problem or CheckpointSaveError(errno.EIO, f"checkpoint step {step}: rank 0 could not create {tmp} "
                                                        "(or there is not enough space)")

    needed = _nbytes(weights) + _nbytes(optimizer_state) + (_nbytes(extra) if rank == 0 else 0)
    try:
        _torch_save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if writer:
            save_file(weights, os.path.join(tmp, weights_file), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, weights_file), 0o666 & ~umask())  # safetensors writes 0600
            _fsync(os.path.join(tmp, weights_file))
            if optimizer_state is not None:
                _torch_save(optimizer_state, os.path.join(tmp, optimizer_file))
        if rank == 0:
            _torch_save(dict(extra or {}), os.path.join(tmp, EXTRA_NAME))
            for key, src in (files or {}).items():
                dest = os.path.join(tmp, key)
                if os.path.isdir(src):
                    shutil.copytree(src, dest)
                else:
                    shutil.copyfile(src, dest)
    except OSError as e:
        problem = _disk_error(e, step, needed, root)
    except Exception as e:  # noqa: BLE001 - any failure: clean up on every rank, then re-raise
        problem = e
    ok = _all_ok(problem is None)  # every stage's files and every rank's RNG file are written

    if ok and rank == 0:
        try:
            inner = getattr(model, "module", model)
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "step": step, "world_size": where.world_size,
                "tensor_parallel_size": where.tp, "pipeline_parallel_size": where.pp,
                "data_parallel_size": where.world_size // (where.tp * where.pp),
                "virtual_pipeline_parallel_size": where.virtual, "distributed_optimizer": distributed_optimizer,
                "model": type(inner).__name__, "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                "stages": [{"weights": stage_file_names(m["stage"], where.pp)[0],
                            "optimizer": stage_file_names(m["stage"], where.pp)[1] if optimizer is not None else None}
                           for m in stage_metas],
                "parameters": {n: entry for m in stage_metas for n, entry in m["parameters"].items()},
            }
            atomic_write_text(os.path.join(tmp, META_NAME), json.dumps(meta, indent=1) + "\n")
            _fsync(tmp)
            _publish(root, tmp, final, name, overwrite)
            if keep_last is not None:
                _prune(root, keep_last, final)
        except OSError as e:
            problem = _disk_error(e, step, needed, root)
    if not ok or problem is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ok(ok and problem is None):
        raise problem or CheckpointSaveError(errno.EIO, f"checkpoint step {step}: another rank failed to write "
                                                        "its part; nothing was saved")
    return final


def resolve_checkpoint(directory: PathLike, fn: str = "load_checkpoint") -> str:
    """The step directory to load: ``directory`` itself when it holds a checkpoint (meta.json), else the
    newest complete ``step_*`` directory under it — one rule for resuming, generating and evaluating.
    ``latest`` is written for people and tools but not trusted: a missing, stale or hand-edited ``latest``
    cannot make a command pick an older checkpoint (:func:`latest_mismatch` says when it disagrees).
    Raises FileNotFoundError naming what was looked for."""
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"megacore.training.{fn}: checkpoint directory {path} does not exist")
    if os.path.isfile(os.path.join(path, META_NAME)):
        return path
    dirs = _step_dirs(path)
    if not dirs:
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise FileNotFoundError(f"megacore.training.{fn}: {path} has {WEIGHTS_NAME} but no {META_NAME}: an "
                                    "incomplete or foreign checkpoint")
        raise FileNotFoundError(f"megacore.training.{fn}: no checkpoint in {path} (expected {META_NAME}, or "
                                f"step_XXXXXXXX directories and a '{LATEST_NAME}' file)")
    return dirs[-1][1]


def newest_checkpoint(directory: PathLike) -> Optional[str]:
    """The newest complete step directory under the checkpoint root ``directory``, or None when there is
    none (or no such directory)."""
    root = os.fspath(directory)
    dirs = _step_dirs(root) if os.path.isdir(root) else []
    return dirs[-1][1] if dirs else None


def latest_mismatch(directory: PathLike) -> Optional[str]:
    """None when ``<directory>/latest`` names the newest complete checkpoint; otherwise a phrase saying how
    it disagrees (``"'latest' is missing"``, ``"'latest' names step_00000009, which is not a complete
    checkpoint"``, ...), for the message of a command that resolved the checkpoint anyway."""
    root = os.fspath(directory)
    newest = newest_checkpoint(root)
    if newest is None:
        return None
    latest = os.path.join(root, LATEST_NAME)
    if not os.path.isfile(latest):
        return f"'{LATEST_NAME}' is missing"
    with open(latest, encoding="utf-8") as f:
        named = f.read().strip()
    if named == os.path.basename(newest):
        return None
    if _STEP_DIR.match(named) and os.path.isfile(os.path.join(root, named, META_NAME)):
        return f"'{LATEST_NAME}' names {named}, an older checkpoint"
    return f"'{LATEST_NAME}' names {named!r}, which is not a complete checkpoint"


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read(path: str, what: str, fn: str, read):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"megacore.training.{fn}: {what} {path} is missing: an incomplete checkpoint")
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
        raise ValueError(f"megacore.training.{fn}: {what} {path} is corrupt or not a megacore checkpoint "
                         f"({type(e).__name__}: {e})") from e


def _read_meta(path: str, fn: str) -> dict:
    meta = _read(os.path.join(path, META_NAME), "metadata", fn, _read_json)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"megacore.training.{fn}: {os.path.join(path, META_NAME)} is not a megacore checkpoint's "
                         f"metadata (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"megacore.training.{fn}: {path} has format version {meta['version']}; this megacore reads "
                         f"up to {FORMAT_VERSION}")
    return meta


def _check_names(path: str, meta: dict, model: nn.Module, names: list[str], where: _Place, fn: str) -> None:
    """ValueError naming the parameters the model has and the checkpoint lacks, and those the checkpoint has
    and no stage of the model holds (a collective over the pipeline group for a cut model, whose other stages
    hold the rest; skipped for a stage loaded without model parallelism)."""
    saved = meta["parameters"]
    missing = sorted(n for n in names if n not in saved)
    held: Optional[set] = set(names)
    if where.cut:
        held = None
        if state.model_parallel_is_initialized():
            every = [None] * where.pp
            dist.all_gather_object(every, names, group=state.get_parallel_state().pipeline_parallel_group)
            held = {n for stage in every for n in stage}
    unexpected = sorted(set(saved) - held) if held is not None else []
    if missing or unexpected:
        inner = getattr(model, "module", model)
        raise ValueError(f"megacore.training.{fn}: {path} does not match the model ({type(inner).__name__}): "
                         f"missing {missing}, unexpected {unexpected}")


def _read_weights(path: str, meta: dict, names: list[str], fn: str) -> dict[str, torch.Tensor]:
    """The full tensors of ``names``, each read alone from the file meta.json names for it."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(meta["parameters"][n].get("file", WEIGHTS_NAME), []).append(n)
    out = {}
    for file, wanted in sorted(by_file.items()):
        def read(p, wanted=wanted):
            with safe_open(p, framework="pt") as f:
                return {n: f.get_tensor(n) for n in wanted}
        out.update(_read(os.path.join(path, file), "weights file", fn, read))
    return out


def load_checkpoint(directory: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict:
    """Loads a checkpoint written by :func:`save_checkpoint`, at any layout, into ``model`` (in place: the
    parameters keep their identity, so an optimizer built on them stays valid) and ``optimizer``; returns the
    saved ``extra`` dict, with ``"step"`` set to the checkpoint's step unless ``extra`` held that key.

    Args:
        directory: a step directory, or a checkpoint root (its ``latest``; see :func:`resolve_checkpoint`).
        model: whole or one pipeline stage (``cut_stage``), at any tensor-parallel size, whatever the saving
            run's: each rank reads the tensors of the parameters it holds and takes its shard of them (vocab
            tables padded to the model's padded vocab); the last stage's tied copy of the word embedding is the
            first stage's. The parameters are cast to the model's dtype and device.
        optimizer: a torch optimizer (over the model's parameters or fp32 masters of them, as for
            :func:`save_checkpoint`) or the distributed optimizer, whichever the saving run had; its state
            (moments resharded, step counts, hyper-parameters) is replaced; fp32 masters take the saved masters,
            or the saved weights when the checkpoint has none (an fp32 run). How the optimizer computes a step
            (``foreach``, ``fused``) stays its own. The checkpoint must have been saved with one.
        restore_rng: set this rank's torch/CUDA/numpy/python RNG states. At the saving layout (the same world,
            tensor-, pipeline- and virtual-pipeline-parallel sizes: each rank holds the layers it held) each rank
            takes its own ``rng_rank{rank}.pt``, so a resumed run continues bit for bit. At another layout ranks
            do not correspond: every rank takes global rank 0's state (the first stage's), so the streams
            continue from the saving run's and every rank draws alike, as tensor-parallel ranks must (their
            dropout seeds come from it) and as a run seeded alike does; the draws after the load differ from
            those the saving layout would have made.

    Every rank calls it. Collectives: over the pipeline group for a cut model (checking that every saved
    parameter has a stage), and the distributed optimizer's over the data-parallel group. Raises
    FileNotFoundError for a missing checkpoint or file, ValueError for a corrupt file or one that does not match
    the model (names, shapes) or the optimizer (which names the function and the parameter).
    """
    fn = "load_checkpoint"
    path = resolve_checkpoint(directory, fn)
    meta = _read_meta(path, fn)
    where = _place(model, fn)
    params = param_shards(model, where.tp)
    names = [info.name for info in params]
    _check_names(path, meta, model, names, where, fn)
    full = _read_weights(path, meta, names, fn)
    if optimizer is not None and _is_distributed_optimizer(optimizer):
        optimizer.wait_for_params()  # an all-gather in flight would overwrite what is loaded here
    weights = {}
    with torch.no_grad():
        for info in params:
            weights[info.name] = _shard(info, full[info.name], where.tp_rank, f"parameter {info.name}", fn)
            info.param.copy_(weights[info.name])
    del full
    if optimizer is not None:
        _load_optimizer(optimizer, params, weights, path, meta, where.tp_rank, fn)
    del weights

    extra = _read(os.path.join(path, EXTRA_NAME), "extra state", fn,
                  lambda p: torch.load(p, map_location="cpu", weights_only=True))
    if restore_rng:
        saved_layout = (meta.get("world_size"), meta.get("tensor_parallel_size"), meta.get("pipeline_parallel_size", 1),
                        meta.get("virtual_pipeline_parallel_size", 1))
        source = where.rank if saved_layout == (where.world_size, where.tp, where.pp, where.virtual) else 0
        rng_path = os.path.join(path, f"rng_rank{source}.pt")
        _set_rng_state(_read(rng_path, "RNG state", fn, lambda p: torch.load(p, map_location="cpu", weights_only=True)))
    extra.setdefault("step", meta["step"])
    return extra


def read_checkpoint_meta(directory: PathLike) -> dict:
    """The ``meta.json`` of the checkpoint :func:`resolve_checkpoint` picks (step, parallel sizes, parameter
    shapes), plus ``"path"``: its step directory."""
    path = resolve_checkpoint(directory, "read_checkpoint_meta")
    return {**_read_meta(path, "read_checkpoint_meta"), "path": path}


__all__ = ["CheckpointSaveError", "latest_mismatch", "load_checkpoint", "newest_checkpoint", "read_checkpoint_meta",
           "remove_stale_temporaries", "resolve_checkpoint", "save_checkpoint", "stage_file_names",
           "step_directory_name"]
