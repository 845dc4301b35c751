"""Data parallelism: ``DistributedDataParallel``, gradients averaged over the data-parallel group.

The bookkeeping is C++ (cpp/parallel/reducer.cpp, ``torch.classes.megacore.Reducer``): gradients live
in a few contiguous buckets, and a bucket's asynchronous all-reduce starts as soon as its last gradient
is ready, overlapping the rest of backward. This module owns only the autograd side: a
post-accumulate-grad hook per parameter, and the end-of-backward callback that waits for the
reductions.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

import megacore  # noqa: F401  (loads megacore._C: registers torch.classes.megacore.Reducer)
from megacore._profiling import phase
from megacore.parallel import state

_NAME = "megacore.parallel.DistributedDataParallel"


def grad_of(p: torch.Tensor):
    """The gradient an optimizer step reads: ``p.main_grad`` (DistributedDataParallel's bucket view) when
    present, else ``p.grad`` (None when the parameter got none)."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def _data_parallel_group(group: Union[dist.ProcessGroup, str, None]) -> dist.ProcessGroup:
    """The group to average over: ``group``, else the data-parallel group, else WORLD (see the class doc)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{_NAME}: torch.distributed is not initialized; call torch.distributed.init_process_group "
            "(and megacore.parallel.initialize_model_parallel for tensor/pipeline parallelism) first"
        )
    if group is None:
        return state.get_data_parallel_group() if state.model_parallel_is_initialized() else dist.group.WORLD
    if isinstance(group, str):
        try:
            group = dist.distributed_c10d._resolve_process_group(group)
        except Exception as e:  # noqa: BLE001 - re-raised with our name
            raise ValueError(f"{_NAME}: data_parallel_group '{group}' names no registered process group") from e
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"{_NAME}: this rank (global rank {dist.get_rank()}) is not a member of data_parallel_group; "
            "every rank must pass the data-parallel group it belongs to"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{_NAME}: data_parallel_group must be a ProcessGroup, a group name or None, "
                        f"got {type(group).__name__}")
    if state.model_parallel_is_initialized() and group.size() != state.get_data_parallel_world_size():
        s = state.get_parallel_state()
        raise ValueError(
            f"{_NAME}: data_parallel_group has {group.size()} ranks, expected the data-parallel size "
            f"{s.data_parallel_size} (world {dist.get_world_size()} / tensor_parallel_size "
            f"{s.tensor_parallel_size} / pipeline_parallel_size {s.pipeline_parallel_size}); pass None or "
            "megacore.parallel.get_data_parallel_group()"
        )
    return group


class DistributedDataParallel(nn.Module):
    """Wraps ``module`` so that ``loss.backward()`` leaves every gradient averaged over the data-parallel group.

    Args:
        module: the model replica; every rank must build it with the same parameters (same seed), on
            its final device and dtype (wrap after ``.to(...)``: the gradient buffers follow the
            parameters as they are now).
        bucket_size_mb: a bucket closes once it holds this many MiB of gradients (> 0). Smaller
            buckets start communicating earlier; larger ones make fewer, bigger all-reduces.
        grad_dtype: dtype of the gradient buffers; None: each parameter's dtype. ``torch.float32``
            with bf16/fp16 parameters keeps fp32 gradients (``param.main_grad``).
        data_parallel_group: a ProcessGroup or its ``group_name``; None: megacore.parallel's
            data-parallel group when ``initialize_model_parallel`` was called, else the default group.
        reduce_scatter: reduce-scatter each bucket instead of all-reducing it (ZeRO-1, for
            ``megacore.training.DistributedOptimizer``). Buckets are then padded to a multiple of the
            group size (times a 64-byte alignment) and, after a reducing backward, only this rank's
            contiguous 1/world slice of each bucket (``reducer.shard_range(bucket)``) holds the averaged
            gradient; ``param.main_grad`` (and ``param.grad`` when it is the bucket view) is unspecified
            outside that slice. ``reducer.param_offset(i)`` says where ``parameters_in_bucket_order()[i]``
            starts in its bucket.

    Every trainable parameter gets ``param.main_grad``, its view into a bucket. When the grad dtype is
    the parameter's, ``param.grad`` is that same view (autograd accumulates into it in place, like
    torch DDP's ``gradient_as_bucket_view``); otherwise ``param.grad`` is added into ``main_grad`` and
    freed, so optimizers must read ``main_grad`` and ``zero_grad_buffers()`` clears it. Gradients are
    complete and averaged when ``backward()`` returns; inside ``no_sync()`` they only accumulate. A
    parameter unused on this rank contributes zero; after a reducing backward its ``param.grad`` is its
    bucket view (the other ranks' average, zero if no rank used it). One reduction per
    ``backward()``: reentrant activation checkpointing (a nested backward) is not supported.
    ``state_dict``/``named_parameters`` are the wrapped module's (no ``module.`` prefix).

    Raises RuntimeError when torch.distributed is not initialized; ValueError for ``bucket_size_mb``
    <= 0, a module without trainable parameters, a group this rank is not in, or a group whose size is
    not the data-parallel size; TypeError for arguments of the wrong type. ``backward()`` raises
    RuntimeError naming the bucket when its all-reduce fails or exceeds the group's timeout.
    """

    def __init__(
        self,
        module: nn.Module,
        bucket_size_mb: float = 25,
        grad_dtype: Optional[torch.dtype] = None,
        data_parallel_group: Union[dist.ProcessGroup, str, None] = None,
        reduce_scatter: bool = False,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"{_NAME}: module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(bucket_size_mb, bool) or not isinstance(bucket_size_mb, (int, float)):
            raise TypeError(f"{_NAME}: bucket_size_mb must be a number, got {type(bucket_size_mb).__name__}")
        if not (bucket_size_mb > 0 and math.isfinite(bucket_size_mb)):
            raise ValueError(f"{_NAME}: bucket_size_mb={bucket_size_mb} must be a finite number > 0")
        if grad_dtype is not None and not (isinstance(grad_dtype, torch.dtype) and grad_dtype.is_floating_point):
            raise TypeError(f"{_NAME}: grad_dtype must be None or a floating torch.dtype, got {grad_dtype!r}")
        if not isinstance(reduce_scatter, bool):
            raise TypeError(f"{_NAME}: reduce_scatter must be a bool, got {type(reduce_scatter).__name__}")
        group = _data_parallel_group(data_parallel_group)

        self.module = module
        self.data_parallel_group = group
        # Reverse registration order: backward produces the last layers' gradients first.
        self._params = [p for p in module.parameters() if p.requires_grad][::-1]
        if not self._params:
            raise ValueError(f"{_NAME}: the module has no parameter that requires grad: nothing to reduce")
        bucket_bytes = max(1, int(bucket_size_mb * 2**20))
        self.reduce_scatter = reduce_scatter
        # A parameter two pipeline stages hold (the tied word embedding) gets a bucket of its own on both, so
        # that they slice its gradient alike (the stages' other parameters differ).
        from megacore.parallel.pipeline import tied_parameters

        tied = {id(p) for p in tied_parameters(module)}
        own_bucket = [i for i, p in enumerate(self._params) if id(p) in tied]
        self.reducer = torch.classes.megacore.Reducer(self._params, grad_dtype, bucket_bytes, group.group_name,
                                                      reduce_scatter, own_bucket)
        self._main_grads = self.reducer.main_grads()
        self._finalize_queued = False
        self._hook_handles = []
        for index, (param, main_grad) in enumerate(zip(self._params, self._main_grads)):
            if param.grad is not None:  # keep a gradient computed before wrapping
                main_grad.copy_(param.grad)
            param.main_grad = main_grad
            param.grad = main_grad if main_grad.dtype == param.dtype else None
            self._hook_handles.append(param.register_post_accumulate_grad_hook(self._make_hook(index)))
        self.register_state_dict_post_hook(_strip_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    def _make_hook(self, index: int):
        main_grad = self._main_grads[index]
        as_view = main_grad.dtype == self._params[index].dtype

        def hook(param: torch.Tensor) -> None:
            if as_view:
                if param.grad is not main_grad:
                    # param.grad was None (zero_grad(set_to_none=True)): autograd made a fresh tensor
                    # holding this backward's whole gradient. Move it into the bucket.
                    main_grad.copy_(param.grad)
                    param.grad = main_grad
            else:
                main_grad.add_(param.grad)  # e.g. bf16 gradient into the fp32 buffer
                param.grad = None
            if not self._finalize_queued:
                self._finalize_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self.reducer.mark_ready(index)

        return hook

    def _finalize(self) -> None:
        """End of backward: the gradients are complete (and averaged, unless in no_sync) after this."""
        self._finalize_queued = False
        # Parameters unused on this rank since zero_grad(set_to_none=True): their local gradient is zero,
        # not the stale bucket content.
        cleared = [
            index
            for index in self.reducer.params_not_ready()
            if self._params[index].grad is None and self._main_grads[index].dtype == self._params[index].dtype
        ]
        for index in cleared:
            self._main_grads[index].zero_()
        with phase("megacore.grad_sync"):  # waits for the bucket all-reduces still in flight
            self.reducer.finalize()
        if self.reducer.sync_enabled():
            for index in cleared:  # other ranks may have used it: the average is its gradient
                self._params[index].grad = self._main_grads[index]

    def parameters_in_bucket_order(self) -> list[nn.Parameter]:
        """The trainable parameters in the reducer's order: index ``i`` is the reducer's parameter ``i``
        (``reducer.bucket_of(i)``, ``reducer.param_offset(i)``, ``reducer.main_grad(i)``)."""
        return list(self._params)

    def forward(self, *args, **kwargs):
        """Calls the wrapped module."""
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Within this context backward only accumulates gradients into the buckets; the first backward
        after it all-reduces the accumulated sum once (gradient accumulation over micro-batches)."""
        previous = self.reducer.sync_enabled()
        self.reducer.set_sync(False)
        try:
            yield
        finally:
            self.reducer.set_sync(previous)

    def zero_grad_buffers(self) -> None:
        """Zeroes every ``main_grad`` (the bucket buffers) in place; ``param.grad`` is left as it is."""
        self.reducer.zero_grad_buffers()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradient buffers. With ``set_to_none`` the ``param.grad`` that are bucket views become
        None (the next backward writes into the bucket again); otherwise they stay the zeroed views."""
        self.zero_grad_buffers()
        for param, main_grad in zip(self._params, self._main_grads):
            if main_grad.dtype == param.dtype:
                param.grad = None if set_to_none else main_grad

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """The wrapped module's named parameters (no ``module.`` prefix)."""
        return self.module.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)


def _strip_module_prefix(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: ``<prefix>module.x`` -> ``<prefix>x``, so checkpoints match the bare model."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_module_prefix(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook, the inverse of ``_strip_module_prefix``; keys that already carry
    ``module.`` (torch DDP checkpoints) load as they are."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[prefix + "module." + key[len(prefix):]] = state_dict.pop(key)
