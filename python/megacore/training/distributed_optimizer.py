"""The distributed optimizer (ZeRO-1, Megatron-LM's ``--use-distributed-optimizer``): each data-parallel rank
keeps the fp32 master weights and the AdamW moments of 1/DP of the parameters only.

How a step goes (``DistributedDataParallel(model, grad_dtype=torch.float32, reduce_scatter=True)``):

    backward          each gradient bucket is reduce-scattered as soon as it is complete (overlapping the
                      rest of backward): rank r's contiguous slice [r n/DP, (r+1) n/DP) of bucket b holds the
                      averaged fp32 gradient of those elements
    optimizer         AdamW steps on this rank's *pieces*: for every parameter overlapping its slices, the
                      flat fp32 master of the overlapping elements, whose .grad is the slice itself
    masters -> model  each piece is written (rounded to the model's dtype) into a flat parameter buffer laid
                      out like the gradient bucket (the model's parameters are views into it), and each
                      bucket's all-gather is launched at once, asynchronously
    next forward      a module waits for the all-gathers of the buckets holding its parameters only when it
                      runs (a forward pre-hook), so the all-gathers overlap the start of the next forward

Per rank this keeps 12/DP bytes per parameter of optimizer state (fp32 master + two fp32 moments) instead of
12, plus the model's parameters and the fp32 gradient buckets, which are not sharded (ZeRO-1).
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megacore.parallel import state as parallel_state
from megacore.parallel.collectives import all_gather, all_reduce
from megacore.parallel.distributed import DistributedDataParallel
from megacore.parallel.timeouts import group_timeout
from megacore.training.optim import NO_DECAY, check_adamw_arguments, fused_supported, parameter_groups
from megacore.training.precision import MixedPrecision

_NAME = "megacore.training.DistributedOptimizer"
_DEFAULT_TIMEOUT = timedelta(seconds=300)  # the bound when the backend hides the group's timeout (as group.h)
_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # every DistributedOptimizer, for wait_for_all_params


def wait_for_all_params() -> None:
    """Waits for the parameter all-gathers still in flight of every live DistributedOptimizer. The last step's
    are left running (the next forward would wait for them): call this before
    ``torch.distributed.destroy_process_group``, since a gloo collective still running when its group is
    destroyed aborts the process. Also run at interpreter exit (atexit)."""
    for optimizer in list(_LIVE):
        optimizer.wait_for_params()


atexit.register(wait_for_all_params)
parallel_state.add_pending_work_hook(wait_for_all_params)  # destroy_model_parallel / finish_pending_work wait first
# AdamW settings that say how the step is computed here, not what it computes: a loaded state keeps ours.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class _Bucket:
    """One gradient bucket of the reducer and its parameter buffer."""

    params: list[int]  # the reducer's parameter indices in this bucket
    grads: torch.Tensor  # [n] fp32: the reducer's gradient buffer
    values: torch.Tensor  # [n] model dtype: the parameters are views into it, at the gradients' offsets
    start: int  # this rank's slice of both buffers: [start, end)
    end: int
    work: Any = None  # the parameter all-gather in flight
    send: Optional[torch.Tensor] = None  # its input, kept alive until it is waited for


@dataclass
class _Piece:
    """The part of one parameter inside this rank's slice of its bucket."""

    name: str
    param: nn.Parameter  # the model's parameter
    bucket: int
    first: int  # [first, last): the elements of the flattened parameter
    last: int
    offset: int  # where element `first` sits in the bucket buffers
    master: nn.Parameter  # [last - first] fp32; for an fp32 model, a view of `value` (the weights are the masters)
    grad: torch.Tensor  # [last - first] fp32 view of the gradient bucket
    value: torch.Tensor  # [last - first] model-dtype view of the parameter buffer


class DistributedOptimizer(torch.optim.AdamW):
    """AdamW over this data-parallel rank's 1/DP share of the parameters (ZeRO-1); see the module docstring.

    Args:
        ddp: the ``megacore.parallel.DistributedDataParallel`` wrapping ``model``, built with
            ``grad_dtype=torch.float32`` and ``reduce_scatter=True``.
        model: the bare model ``ddp`` wraps (its parameters' current values become the masters, upcast to
            fp32), or the ``MixedPrecision`` that cast it to bf16/fp16, whose fp32 masters (the values
            before the cast) become the masters; drop the ``MixedPrecision`` afterwards, this object
            replaces it.
        lr, weight_decay, betas, eps, no_decay, layer_lr_decay: as ``build_optimizer``; the decay groups are
            ``parameter_groups(model, weight_decay, no_decay, layer_lr_decay)``'s, on every rank (a group with no piece
            on this rank is kept, empty).
        overlap_param_gather: True: the next forward waits for a bucket's parameter all-gather when a
            module owning parameters in it runs; False: ``copy_master_to_model`` waits for them all.

    The model's parameters become views into one flat buffer per bucket (their values and the Parameter
    objects stay); do not move or cast the model afterwards. Every bucket's parameters must share a dtype.
    AdamW is ``torch.optim.AdamW`` (this class), fused where torch supports it, else ``foreach``; its
    ``param_groups`` (lr, weight_decay per group, for ``LRSchedule``) hold the pieces. A piece names its
    parameter (``model_param``), so ``clip_grad_norm`` with the model's ``ParallelPlan`` counts it like its
    parameter; it and the loss scaler must be told ``data_parallel_sharded=True`` (the ``Trainer`` reads
    ``sharded_over_data_parallel``).

    When forward waits: a parameter's *owner* is the module holding it if that module's forward ran in the
    forwards before the first ``copy_master_to_model`` (the first step), else its nearest ancestor whose
    forward ran (GPT's position table is a plain ``nn.Module`` holding a ``weight`` that the embedding reads;
    ELECTRA's generator calls its head's ``transform``, not its forward), else the model. Afterwards the
    owner's forward pre-hook waits for the all-gathers of its parameters' buckets; a module whose forward
    had not run by then waits for every bucket of its subtree. So a parameter must not be read before its
    owner's forward starts (a module reading a sibling's weight before that sibling runs, or a module whose
    forward ran during those first forwards being read later through another method, would see the
    previous step's values outside this rank's slices); reading it later in the same forward (tied
    embeddings) is fine. Outside a forward call ``wait_for_params()`` first (``model.state_dict()`` does).

    Used by the ``Trainer`` as both its optimizer and its precision (the masters protocol:
    ``parameters()``, ``named_parameters()``, ``copy_grads_to_master()``, ``copy_master_to_model()``,
    ``zero_master_grads()``): ``Trainer(ddp, opt, schedule, precision=opt, ddp=ddp, ...)``.

    Raises TypeError for a ``ddp`` that is not a megacore DistributedDataParallel, a ``model`` that is
    neither an nn.Module nor a MixedPrecision, or gradient buffers that are not fp32; ValueError for a ddp
    not in reduce-scatter mode, a model that is not the one ``ddp`` wraps, a bucket mixing parameter dtypes,
    and for bad hyper-parameters (as ``build_optimizer``).
    """

    sharded_over_data_parallel = True  # norms and overflow checks must be reduced over the DP group too
    enabled = True  # the Trainer's precision protocol: the optimizer steps on separate masters

    def __init__(self, ddp: DistributedDataParallel, model, lr: float, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 no_decay: Sequence[str] = NO_DECAY, overlap_param_gather: bool = True, layer_lr_decay: float = 1.0):
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"{_NAME}: ddp must be a megacore.parallel.DistributedDataParallel, "
                            f"got {type(ddp).__name__}")
        precision = model if isinstance(model, MixedPrecision) else None
        model = precision.model if precision is not None else model
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: model must be the torch.nn.Module that ddp wraps (or the MixedPrecision "
                            f"that cast it), got {type(model).__name__}")
        if ddp.module is not model:
            raise ValueError(f"{_NAME}: model is not the module ddp wraps; pass the model given to "
                             "DistributedDataParallel (or the MixedPrecision that cast it)")
        if not ddp.reduce_scatter:
            raise ValueError(f"{_NAME}: ddp all-reduces its gradients (reduce_scatter=False); build it with "
                             "DistributedDataParallel(model, grad_dtype=torch.float32, reduce_scatter=True)")
        reducer, params = ddp.reducer, ddp.parameters_in_bucket_order()
        for b in range(reducer.num_buckets()):
            dtype = reducer.bucket_buffer(b).dtype
            if dtype != torch.float32:
                raise TypeError(f"{_NAME}: ddp's gradient buffers are {dtype} (bucket {b}); expected torch.float32: "
                                "build it with DistributedDataParallel(model, grad_dtype=torch.float32, "
                                "reduce_scatter=True)")
            dtypes = sorted({str(params[i].dtype) for i in reducer.bucket_params(b)})
            if len(dtypes) > 1:
                raise ValueError(f"{_NAME}: bucket {b} holds parameters of dtypes {', '.join(dtypes)}; the "
                                 "distributed optimizer needs one dtype per bucket (cast the model to one dtype)")
        check_adamw_arguments(_NAME, lr, weight_decay, betas, eps)
        if not isinstance(overlap_param_gather, bool):
            raise TypeError(f"{_NAME}: overlap_param_gather must be a bool, got {type(overlap_param_gather).__name__}")

        self.model, self.ddp, self.data_parallel_group = model, ddp, ddp.data_parallel_group
        self.overlap_param_gather = overlap_param_gather
        self.dtype = params[0].dtype
        name_of: dict[int, str] = {}
        for name, p in model.named_parameters():
            name_of.setdefault(id(p), name)
        fp32_of = ({id(m.model_param): m for m in precision.parameters()}
                   if precision is not None and precision.enabled else {})
        groups = parameter_groups(model, weight_decay, no_decay, layer_lr_decay)
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        # The whole group structure, the same on every rank (full_state lists it).
        self._group_names = [list(g["names"]) for g in groups]

        self._buckets: list[_Bucket] = []
        self._pieces: list[_Piece] = []
        with torch.no_grad():
            for b in range(reducer.num_buckets()):
                members = list(reducer.bucket_params(b))
                grads = reducer.bucket_buffer(b)
                values = torch.zeros(grads.numel(), dtype=params[members[0]].dtype, device=grads.device)  # [n]
                start, end = reducer.shard_range(b)
                self._buckets.append(_Bucket(members, grads, values, start, end))
                for i in members:
                    p, offset, n = params[i], reducer.param_offset(i), params[i].numel()
                    values[offset: offset + n].copy_(p.detach().reshape(-1))
                    p.data = values[offset: offset + n].view(p.shape)
                    lo, hi = max(offset, start), min(offset + n, end)
                    if lo >= hi:
                        continue
                    value = values[lo:hi]
                    if value.dtype == torch.float32:
                        master = nn.Parameter(value)  # shares value's memory
                    else:
                        source = fp32_of.get(id(p))
                        source = value if source is None else source.detach().reshape(-1)[lo - offset: hi - offset]
                        master = nn.Parameter(source.to(torch.float32, copy=True))
                    master.model_param = p  # which model parameter this is a piece of (the parallel plan follows it)
                    self._pieces.append(_Piece(name_of[id(p)], p, b, lo - offset, hi - offset, lo, master,
                                               grads[lo:hi], value))
        self._piece_of = {id(piece.master): piece for piece in self._pieces}
        self._name_of = name_of
        # Half-precision models' pieces are copies, written back after the step; fp32 pieces are the weights.
        self._copies = [piece for piece in self._pieces if piece.value.dtype != torch.float32]

        optimizer_groups = [{"params": [], "weight_decay": g["weight_decay"], "names": [],
                             **({"lr_scale": g["lr_scale"]} if "lr_scale" in g else {})} for g in groups]
        for piece in self._pieces:
            gi = group_of[id(piece.param)]
            optimizer_groups[gi]["params"].append(piece.master)
            optimizer_groups[gi]["names"].append(piece.name)
        # The fused kernel's choice must not depend on which pieces a rank got: decide from the gradients.
        fused = fused_supported([bucket.grads for bucket in self._buckets])
        super().__init__(optimizer_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         fused=fused or None, foreach=None if fused else True)

        self._bucket_of = {id(p): reducer.bucket_of(i) for i, p in enumerate(params)}
        self._forwards_seen: Optional[set[int]] = set()  # modules whose forward ran; None once owners are set
        self._waits: dict[int, tuple[int, ...]] = {}  # module -> the buckets it waits for, last first
        self._hook_handles = [module.register_forward_pre_hook(self._before_forward) for module in model.modules()]
        self._hook_handles.append(model.register_state_dict_pre_hook(lambda *args: self.wait_for_params()))
        _LIVE.add(self)

    @property
    def group_names(self) -> list[list[str]]:
        """Every parameter group's parameter names, whole model (the same on every data-parallel rank; a
        rank's ``param_groups`` hold only its pieces)."""
        return [list(names) for names in self._group_names]

    # ---- the masters protocol (the Trainer's precision) ------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """This rank's fp32 master pieces (flat 1-D), in ``param_groups`` order."""
        return [p for g in self.param_groups for p in g["params"]]

    def named_parameters(self):
        """``(parameter name, master piece)`` for every piece on this rank (at most one per parameter), in
        ``param_groups`` order."""
        return [(self._piece_of[id(p)].name, p) for p in self.parameters()]

    def model_parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters (every rank holds all of them), in the reducer's order."""
        return self.ddp.parameters_in_bucket_order()

    def copy_grads_to_master(self) -> None:
        """Sets each piece's ``.grad`` to its slice of the reduce-scattered fp32 gradient bucket (a view: no copy;
        unscaling and clipping act on the bucket in place). Call after the reducing backward."""
        for piece in self._pieces:
            piece.master.grad = piece.grad

    @torch.no_grad()
    def copy_master_to_model(self) -> None:
        """Writes the pieces into the model's parameters on every data-parallel rank: each piece into this rank's
        slice of its parameter buffer (rounded to the model's dtype), then one asynchronous all-gather per
        bucket (last bucket first: the order the next forward needs them, the same on every rank). Waits for
        them unless ``overlap_param_gather``. Collective over the data-parallel group."""
        if self.overlap_param_gather and self._forwards_seen is not None:
            self._assign_owners()  # the first time all-gathers are left in flight: forward must know what to wait for
        self._launch_param_gathers()
        if not self.overlap_param_gather:
            self.wait_for_params()

    @torch.no_grad()
    def _launch_param_gathers(self) -> None:
        """The pieces into this rank's slices of the parameter buffers, then every bucket's all-gather."""
        self.wait_for_params()
        if self._copies:
            torch._foreach_copy_([piece.value for piece in self._copies], [piece.master for piece in self._copies])
        if self.data_parallel_group.size() > 1:
            for bucket in reversed(self._buckets):
                shard = bucket.values[bucket.start: bucket.end]
                # NCCL gathers in place (the input is the output's own slice), as Megatron does; gloo gets a copy.
                bucket.send = shard if shard.is_cuda else shard.clone()
                bucket.work = dist.all_gather_single(bucket.values, bucket.send, group=self.data_parallel_group,
                                                     async_op=True)

    def zero_master_grads(self) -> None:
        """Drops the pieces' ``.grad`` (the gradient buckets themselves are zeroed by ``ddp.zero_grad``)."""
        for piece in self._pieces:
            piece.master.grad = None

    def wait_for_params(self) -> None:
        """Waits for every parameter all-gather still in flight; afterwards every model parameter holds the last
        step's update. Forward waits per module by itself; call this before reading parameters elsewhere.
        Raises RuntimeError naming the bucket and the group when an all-gather failed or timed out."""
        self._wait(range(len(self._buckets) - 1, -1, -1))

    def _wait(self, buckets) -> None:
        for b in buckets:
            bucket = self._buckets[b]
            if bucket.work is None:
                continue
            work, bucket.work = bucket.work, None
            try:
                # Untimed on gloo too: gloo runs the collective under the group's timeout itself, so this returns
                # or raises within it; a timed wait would race that timer and could leave gloo's thread still in
                # the collective (seen: an abort at exit). On NCCL the wait is stream-ordered (parallel/wait.h).
                done = work.wait()
            except RuntimeError as e:
                raise RuntimeError(self._wait_error(b, "failed or timed out", f"; did every rank of the group call "
                                                    f"it?): {e}")) from e
            if done is False:
                raise RuntimeError(self._wait_error(b, "did not finish within the group timeout",
                                                    "); did every rank of the group call it?"))
            bucket.send = None

    def _wait_error(self, b: int, what: str, rest: str) -> str:
        """The form of the C++ waits' messages (cpp/parallel/group.cpp), which megacore.parallel.timeouts reads
        back to name the group and the ranks that did not arrive."""
        group = self.data_parallel_group
        ms = int((group_timeout(group) or _DEFAULT_TIMEOUT).total_seconds() * 1000)
        return (f"{_NAME}: the parameter all-gather of bucket {b} of {len(self._buckets)} "
                f"({len(self._buckets[b].params)} parameters) {what} (group '{group.group_name}' "
                f"{getattr(group, 'group_desc', '')}, timeout {ms} ms{rest}")

    def _before_forward(self, module: nn.Module, args) -> None:
        """Forward pre-hook of every module: before the first step it notes that the module ran; afterwards it
        waits for the parameter all-gathers of the buckets the module owns."""
        if self._forwards_seen is not None:
            self._forwards_seen.add(id(module))
        elif id(module) in self._waits:
            self._wait(self._waits[id(module)])

    def _assign_owners(self) -> None:
        """Gives each bucket of each module's own parameters to the module's owner (see the class doc); a module
        whose forward never ran so far waits, if it ever runs, for every bucket of its subtree."""
        seen, self._forwards_seen = self._forwards_seen, None
        parent: dict[int, nn.Module] = {}
        for module in self.model.modules():
            for child in module.children():
                parent.setdefault(id(child), module)
        owned: dict[int, set[int]] = {}
        for module in self.model.modules():
            buckets = {self._bucket_of[id(p)] for p in module.parameters(recurse=False) if id(p) in self._bucket_of}
            if not buckets:
                continue
            owner = module
            while id(owner) not in seen and id(owner) in parent:
                owner = parent[id(owner)]
            owned.setdefault(id(owner), set()).update(buckets)
        for module in self.model.modules():
            if id(module) not in seen:
                owned.setdefault(id(module), set()).update(
                    self._bucket_of[id(p)] for p in module.parameters() if id(p) in self._bucket_of)
        self._waits = {owner: tuple(sorted(buckets, reverse=True)) for owner, buckets in owned.items()}

    # ---- state: full (parameter-shaped, gathered over data-parallel ranks) --------------------------------

    def _local_step(self) -> float:
        for entry in self.state.values():
            if "step" in entry:
                return float(entry["step"])
        return -1.0

    @torch.no_grad()
    def full_state(self, fn: str = "DistributedOptimizer.full_state") -> dict:
        """The whole optimizer state, as one process's AdamW over every parameter would hold it. Collective over
        the data-parallel group (every rank must call it); the result is identical on every rank.

        Returns ``{"param_groups": [{hyper-parameters..., "params": [names], "names": [names]}], "state":
        {name: {"step": 0-dim fp32 tensor, "exp_avg": T, "exp_avg_sq": T}} (empty before the first step),
        "master_params": {name: T}}`` where each ``T`` is an fp32 CPU tensor of the local parameter's full
        shape (this tensor-parallel rank's shard, this pipeline stage's parameter). ``fn`` names the caller in
        errors (``megacore.training.<fn>: ...``).
        """
        group = self.data_parallel_group
        world = group.size()
        device = self._buckets[0].grads.device
        step = self._local_step()
        if world > 1:  # every piece steps together; a rank without pieces learns the step from the others
            step = float(all_reduce(torch.tensor([step], dtype=torch.float64, device=device), group, "max").item())
        kinds = (*_MOMENTS, "master") if step >= 0 else ("master",)
        states: dict[str, dict] = {}
        masters: dict[str, torch.Tensor] = {}
        params = self.ddp.parameters_in_bucket_order()
        reducer = self.ddp.reducer
        for b, bucket in enumerate(self._buckets):
            local = torch.zeros(len(kinds), bucket.end - bucket.start, dtype=torch.float32, device=device)  # [k, n/DP]
            for piece in (p for p in self._pieces if p.bucket == b):
                at = slice(piece.offset - bucket.start, piece.offset - bucket.start + piece.master.numel())
                local[-1, at] = piece.master
                for k, key in enumerate(kinds[:-1]):
                    local[k, at] = self.state[piece.master][key]
            full = all_gather(local.unsqueeze(0), 0, group) if world > 1 else local.unsqueeze(0)  # [DP, k, n/DP]
            full = full.transpose(0, 1).reshape(len(kinds), -1)  # [k, n]
            for i in bucket.params:
                p, offset = params[i], reducer.param_offset(i)
                name = self._name_of[id(p)]
                rows = [full[k, offset: offset + p.numel()].view(p.shape).to("cpu", copy=True)
                        for k in range(len(kinds))]
                masters[name] = rows[-1]
                if step >= 0:
                    states[name] = {"step": torch.tensor(step, dtype=torch.float32),
                                    **{key: rows[k] for k, key in enumerate(kinds[:-1])}}
        param_groups = [{**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": list(names),
                         "names": list(names)} for g, names in zip(self.param_groups, self._group_names)]
        return {"param_groups": param_groups, "state": states, "master_params": masters}

    @torch.no_grad()
    def load_full_state(self, saved: dict, fn: str = "DistributedOptimizer.load_full_state") -> None:
        """Loads a ``full_state`` (from any number of data-parallel ranks, or one process's AdamW state in that
        form, e.g. from a checkpoint): each rank keeps the elements of its pieces. Then writes the masters into
        the model on every rank (``copy_master_to_model`` and ``wait_for_params``). Collective over the
        data-parallel group.

        ``saved["master_params"]`` gives the fp32 masters by name; a parameter missing there (or no
        ``master_params`` at all: an fp32 run, whose weights are the masters) takes its master from the model's
        current values, so load the model's weights first. Hyper-parameters (lr, betas, eps, weight_decay)
        come from ``saved``; how the step is computed (fused or foreach) stays this optimizer's.

        Raises TypeError when ``saved`` is not a dict; KeyError naming a missing key; ValueError, naming
        ``megacore.training.<fn>``, when the groups hold other parameters or a tensor has another shape than
        its parameter (then nothing was changed).
        """
        where = f"megacore.training.{fn}"
        if not isinstance(saved, dict):
            raise TypeError(f"{where}: the state must be a dict (from full_state), got {type(saved).__name__}")
        for key in ("param_groups", "state"):
            if key not in saved:
                raise KeyError(f"{where}: the state has no {key!r} (keys: {', '.join(sorted(map(str, saved)))})")
        if len(saved["param_groups"]) != len(self.param_groups):
            raise ValueError(f"{where}: the state has {len(saved['param_groups'])} parameter groups, the optimizer "
                             f"{len(self.param_groups)}")
        for gi, (saved_group, names) in enumerate(zip(saved["param_groups"], self._group_names)):
            if sorted(saved_group["params"]) != sorted(names):
                raise ValueError(f"{where}: parameter group {gi} of the state holds "
                                 f"{sorted(set(saved_group['params']) ^ set(names))} where the optimizer's does not "
                                 "(or the other way round)")
        saved_masters = saved.get("master_params") or {}
        # Everything is checked and sliced first, so that an error leaves the optimizer as it was.
        local: dict[str, Any] = {"state": {}, "param_groups": []}
        masters: list[tuple[nn.Parameter, torch.Tensor]] = []
        index = 0
        for saved_group, group in zip(saved["param_groups"], self.param_groups):
            hyper = {k: v for k, v in saved_group.items() if k not in ("params", "names")}
            hyper.update({k: group[k] for k in _IMPLEMENTATION_KEYS if k in group})
            local["param_groups"].append({**hyper, "params": list(range(index, index + len(group["params"]))),
                                          "names": list(group["names"])})
            for master in group["params"]:
                piece = self._piece_of[id(master)]
                entry = {}
                for key, value in saved["state"].get(piece.name, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        value = self._slice(piece, value, f"optimizer state {key!r} of {piece.name}", where)
                    elif torch.is_tensor(value):
                        value = value.clone()  # torch's load_state_dict would keep the caller's tensor
                    entry[key] = value
                if entry:
                    local["state"][index] = entry
                if piece.name in saved_masters:
                    masters.append((master, self._slice(piece, saved_masters[piece.name],
                                                        f"master weight {piece.name}", where)))
                else:
                    masters.append((master, piece.param.detach().reshape(-1)[piece.first: piece.last].float()))
                index += 1
        for master, value in masters:
            master.copy_(value)
        super().load_state_dict(local)
        self._launch_param_gathers()
        self.wait_for_params()

    @staticmethod
    def _slice(piece: _Piece, value: torch.Tensor, what: str, where: str) -> torch.Tensor:
        """A copy of ``piece``'s elements of ``value`` (a tensor shaped like its whole parameter), fp32 on its
        device."""
        if tuple(value.shape) != tuple(piece.param.shape):
            raise ValueError(f"{where}: {what} has shape {list(value.shape)}, expected {list(piece.param.shape)} "
                             "(the local parameter's)")
        return value.reshape(-1)[piece.first: piece.last].to(device=piece.master.device, dtype=torch.float32,
                                                              copy=True)

    def state_dict(self) -> dict:
        """``full_state()`` (collective over the data-parallel group)."""
        return self.full_state("DistributedOptimizer.state_dict")

    def load_state_dict(self, state_dict: dict) -> None:
        """``load_full_state(state_dict)`` (collective over the data-parallel group)."""
        self.load_full_state(state_dict, "DistributedOptimizer.load_state_dict")


__all__ = ["DistributedOptimizer"]
