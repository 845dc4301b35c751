"""Training checkpoints: full (unsharded) weights and optimizer state, resumable at any tensor-parallel size.

Layout under a checkpoint root::

    <root>/step_00001000/model.safetensors   every parameter, FULL (shards merged over the TP group), the
                                             vocab tables cut to the vocab size (no TP padding), model dtype
    <root>/step_00001000/optimizer.pt        param_groups (parameter names, hyper-parameters) and the state
                                             of every parameter by name, merged like the weights (AdamW's
                                             exp_avg / exp_avg_sq have the full parameter's shape)
    <root>/step_00001000/extra.pt            the caller's ``extra``: scheduler, loss scaler, data position, ...
    <root>/step_00001000/rng_rank{r}.pt      RNG states of global rank r (torch CPU/CUDA, numpy, python)
    <root>/step_00001000/meta.json           format, step, parallel sizes, every parameter's full shape
    <root>/latest                            the name of the newest complete step directory

A save is atomic: everything is written into ``<root>/.tmp-step_...`` (files fsynced), which is renamed to
its final name, and ``latest`` is replaced (atomically) last; a process killed at any point leaves the
previous checkpoint loadable. Loading splits the full tensors for this rank (``split_weight``; vocab tables
padded with zero rows to the model's padded vocab), so a checkpoint saved at one tensor-parallel size loads at
any other. Pipeline parallelism is not supported.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megacore._files import PathLike, atomic_write_text, umask
from megacore.parallel import state
from megacore.parallel.sharding import ParamShard, gather_full, param_shards, shard_of
from megacore.parallel.timeouts import barrier

FORMAT = "megacore-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
EXTRA_NAME = "extra.pt"
META_NAME = "meta.json"
LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_directory_name(step: int) -> str:
    """``step_00001000`` for step 1000 (zero-padded to 8 digits so names sort by step)."""
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------------------
# Parameters: names, sharding and vocab padding


def _tensor_parallel(fn: str) -> tuple[Optional[dist.ProcessGroup], int, int, int]:
    """(TP group, TP rank, TP size, DP rank) of this process; (None, 0, 1, 0) without model parallelism."""
    if not state.model_parallel_is_initialized():
        return None, 0, 1, 0
    s = state.get_parallel_state()
    if s.pipeline_parallel_size > 1:
        raise NotImplementedError(f"megacore.training.{fn}: pipeline_parallel_size={s.pipeline_parallel_size}; "
                                  "checkpoints support tensor and data parallelism only")
    return s.tensor_parallel_group, s.tensor_parallel_rank, s.tensor_parallel_size, s.data_parallel_rank


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


def _optimizer_full_state(optimizer, params, group, fn: str) -> dict:
    pairs = _optimizer_params(optimizer, params, fn)
    groups, states, masters = [], {}, {}
    for g, members in zip(optimizer.param_groups, pairs):
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [info.name for info, _ in members]})
        for info, p in members:
            entry = {}
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                    entry[key] = _gather(info, value, group)  # a moment: sharded like the parameter
                else:
                    entry[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
            states[info.name] = entry
            if p is not info.param:  # an fp32 master copy: its values are not the (half precision) model's
                masters[info.name] = _gather(info, p, group)
    return {"format": FORMAT, "optimizer_class": type(optimizer).__name__, "param_groups": groups, "state": states,
            "master_params": masters}


def _load_optimizer(optimizer, params, saved: dict, rank: int, path: str, fn: str) -> None:
    pairs = _optimizer_params(optimizer, params, fn)
    if len(saved["param_groups"]) != len(pairs):
        raise ValueError(f"megacore.training.{fn}: {path} has {len(saved['param_groups'])} parameter groups, the "
                         f"optimizer {len(pairs)}")
    state_dict: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for gi, (saved_group, members) in enumerate(zip(saved["param_groups"], pairs)):
        names = [info.name for info, _ in members]
        if sorted(saved_group["params"]) != sorted(names):
            raise ValueError(f"megacore.training.{fn}: parameter group {gi} of {path} holds "
                             f"{sorted(set(saved_group['params']) ^ set(names))} where the optimizer's does not (or "
                             "the other way round)")
        state_dict["param_groups"].append({**saved_group, "params": list(range(index, index + len(members)))})
        for info, p in members:
            entry = {}
            for key, value in saved["state"].get(info.name, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    value = _shard(info, value, rank, f"optimizer state {key!r} of {info.name}", fn)
                entry[key] = value
            if entry:
                state_dict["state"][index] = entry
            if p is not info.param and info.name in saved["master_params"]:
                with torch.no_grad():
                    p.copy_(_shard(info, saved["master_params"][info.name], rank, f"master weight {info.name}", fn))
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
        torch.cuda.set_rng_state_all(rng["cuda"])
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
        model: a megacore model (or any module; a DistributedDataParallel wrapper is fine). Sharded parameters
            (``tensor_parallel`` + ``partition_dim`` tags) are all-gathered over the tensor-parallel group.
        optimizer: a torch optimizer over the model's parameters, or over fp32 master copies of them (one per
            parameter, same shapes, in ``named_parameters()`` order; their values are saved too).
        extra: anything else to resume (scheduler and loss-scaler ``state_dict()``s, consumed samples, the config
            as a dict): tensors, numbers, strings, None, lists, tuples and dicts of them (``torch.load``'s
            ``weights_only`` types), returned by :func:`load_checkpoint`.
        keep_last: after a successful save, delete all but the newest ``keep_last`` step directories (>= 1).
        files: ``{name: path}`` of files or directories copied into the step directory under ``name`` (e.g.
            the tokenizer, so that the checkpoint is self-contained).
        overwrite: replace a complete checkpoint of the same step; by default that is refused
            (FileExistsError), so a complete checkpoint is never lost to a later save.

    Under torch.distributed every rank must call it: the data-parallel-rank-0 replica gathers its shards, global
    rank 0 writes the merged files, every rank writes its own RNG state; all ranks return once the checkpoint is
    complete (the root must be on a file system every rank sees).

    Failures leave nothing behind: weights with a NaN or inf are refused (ValueError) before anything is
    written; an estimated size larger than the free space, or any error while writing (a full disk, no
    permission), raises CheckpointSaveError (an OSError, ``"checkpoint step N: no space left on device (needed
    ~X MB, ...)"``) on every rank, after the partial step directory is removed; ``latest`` and the earlier
    checkpoints are untouched. Raises ValueError/TypeError for bad arguments.
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
        if key in (WEIGHTS_NAME, OPTIMIZER_NAME, EXTRA_NAME, META_NAME) or "/" in key or key.startswith(".") or not key:
            raise ValueError(f"megacore.training.{fn}: files key {key!r} is not a plain name of its own")
        if not os.path.exists(src):
            raise FileNotFoundError(f"megacore.training.{fn}: files[{key!r}] = {src} does not exist")
    from safetensors.torch import save_file

    root = os.path.abspath(os.fspath(directory))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    group, tp_rank, tp, dp_rank = _tensor_parallel(fn)
    params = param_shards(model, tp)
    name = step_directory_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, TMP_PREFIX + name)
    if not overwrite and os.path.isfile(os.path.join(final, META_NAME)):
        raise FileExistsError(f"megacore.training.{fn}: {final} is a complete checkpoint; refusing to overwrite it "
                              "(pass overwrite=True to replace it)")

    weights = optimizer_state = None
    if dp_rank == 0:  # one replica gathers (a collective within each of its TP groups)
        weights = {info.name: _gather(info, info.param, group) for info in params}
        if optimizer is not None:
            optimizer_state = _optimizer_full_state(optimizer, params, group, fn)
    problem: Optional[BaseException] = None
    if rank == 0:
        try:
            _check_finite(weights, step, fn)
        except ValueError as e:
            problem = e
    if not _all_ok(problem is None):
        raise problem or ValueError(f"megacore.training.{fn}: refusing to save step {step}: rank 0 found "
                                    "non-finite weights")

    needed = _nbytes(weights) + _nbytes(optimizer_state) + _nbytes(extra) + (1 << 20)
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            remove_stale_temporaries(root)  # left by a save that was killed
            free = shutil.disk_usage(root).free
            if needed > free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.makedirs(tmp)
    except OSError as e:
        problem = _disk_error(e, step, needed, root)
    if not _all_ok(problem is None):  # the tmp directory exists
        raise problem or CheckpointSaveError(errno.EIO, f"checkpoint step {step}: rank 0 could not create {tmp}")

    try:
        _torch_save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            save_file(weights, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, WEIGHTS_NAME), 0o666 & ~umask())  # safetensors writes 0600
            _fsync(os.path.join(tmp, WEIGHTS_NAME))
            if optimizer_state is not None:
                _torch_save(optimizer_state, os.path.join(tmp, OPTIMIZER_NAME))
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
    ok = _all_ok(problem is None)  # every rank's RNG file is written

    if ok and rank == 0:
        try:
            meta = {
                "format": FORMAT, "version": FORMAT_VERSION, "step": step, "world_size": world_size,
                "tensor_parallel_size": tp, "data_parallel_size": world_size // tp, "model": type(model).__name__,
                "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                "parameters": {info.name: {"shape": info.full_shape(),
                                           "dtype": str(info.param.dtype).replace("torch.", ""),
                                           "partition_dim": getattr(info.param, "partition_dim", None),
                                           "vocab_size": info.vocab_size} for info in params},
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


def load_checkpoint(directory: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict:
    """Loads a checkpoint written by :func:`save_checkpoint` into ``model`` (in place: the parameters keep
    their identity, so an optimizer built on them stays valid) and ``optimizer``; returns the saved ``extra``
    dict, with ``"step"`` set to the checkpoint's step unless ``extra`` held that key.

    Args:
        directory: a step directory, or a checkpoint root (its ``latest``; see :func:`resolve_checkpoint`).
        model: built at any tensor-parallel size: each rank takes its shard of the full tensors (vocab tables
            padded to the model's padded vocab). The parameters are cast to the model's dtype and device.
        optimizer: as for :func:`save_checkpoint`; its state (moments resharded, step counts, hyper-parameters)
            is replaced. The checkpoint must have been saved with one.
        restore_rng: set this rank's torch/CUDA/numpy/python RNG states from ``rng_rank{rank}.pt``; only when
            the world size is the one saved (otherwise the RNG is left alone: ranks do not map one to one).

    Every rank calls it (no collectives: each reads the files). Raises FileNotFoundError for a missing
    checkpoint or file, ValueError for a corrupt file or one that does not match the model (names, shapes).
    """
    fn = "load_checkpoint"
    from safetensors.torch import load_file

    path = resolve_checkpoint(directory, fn)
    meta = _read(os.path.join(path, META_NAME), "metadata", fn, _read_json)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"megacore.training.{fn}: {os.path.join(path, META_NAME)} is not a megacore checkpoint's "
                         f"metadata (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"megacore.training.{fn}: {path} has format version {meta['version']}; this megacore reads "
                         f"up to {FORMAT_VERSION}")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    group, tp_rank, tp, _ = _tensor_parallel(fn)
    params = param_shards(model, tp)

    weights = _read(os.path.join(path, WEIGHTS_NAME), "weights file", fn, load_file)
    names = {info.name for info in params}
    missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
    if missing or unexpected:
        raise ValueError(f"megacore.training.{fn}: {path} does not match the model ({type(model).__name__}): "
                         f"missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for info in params:
            t = _shard(info, weights[info.name], tp_rank, f"parameter {info.name}", fn)
            info.param.copy_(t)

    if optimizer is not None:
        opt_path = os.path.join(path, OPTIMIZER_NAME)
        if not os.path.isfile(opt_path):
            raise FileNotFoundError(f"megacore.training.{fn}: an optimizer was given but {path} was saved without "
                                    f"one (no {OPTIMIZER_NAME})")
        saved = _read(opt_path, "optimizer state", fn, lambda p: torch.load(p, map_location="cpu", weights_only=True))
        _load_optimizer(optimizer, params, saved, tp_rank, path, fn)

    extra = _read(os.path.join(path, EXTRA_NAME), "extra state", fn,
                  lambda p: torch.load(p, map_location="cpu", weights_only=True))
    rng_path = os.path.join(path, f"rng_rank{rank}.pt")
    if restore_rng and meta.get("world_size") == world_size and os.path.isfile(rng_path):
        _set_rng_state(_read(rng_path, "RNG state", fn, lambda p: torch.load(p, map_location="cpu", weights_only=True)))
    extra.setdefault("step", meta["step"])
    return extra


def read_checkpoint_meta(directory: PathLike) -> dict:
    """The ``meta.json`` of the checkpoint :func:`resolve_checkpoint` picks (step, parallel sizes, parameter
    shapes), plus ``"path"``: its step directory."""
    path = resolve_checkpoint(directory, "read_checkpoint_meta")
    meta = _read(os.path.join(path, META_NAME), "metadata", "read_checkpoint_meta",
                 _read_json)
    return {**meta, "path": path}


__all__ = ["CheckpointSaveError", "latest_mismatch", "load_checkpoint", "newest_checkpoint", "read_checkpoint_meta",
           "remove_stale_temporaries", "resolve_checkpoint", "save_checkpoint", "step_directory_name"]
