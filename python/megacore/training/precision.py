"""Mixed precision: fp32 master weights for bf16/fp16 models, and dynamic loss scaling for fp16.

Order of construction: build the model (fp32), ``MixedPrecision(model, dtype)`` (casts it and keeps the
fp32 masters), then ``DistributedDataParallel(model, grad_dtype=torch.float32)`` if data-parallel, then
``build_optimizer(precision, ...)`` so that the optimizer steps on the masters.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from megacore.parallel import state
from megacore.parallel.collectives import all_reduce
from megacore.training.optim import data_parallel_group, grad_of, reduction_device

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MixedPrecision:
    """Keeps fp32 master copies of a bf16/fp16 model's parameters; for fp32 it is a no-op.

    ``MixedPrecision(model, dtype)`` casts ``model``'s floating parameters (and buffers) to ``dtype`` in
    place (the Parameter objects and their tags stay) and, for bf16/fp16, makes an fp32 master of each
    trainable parameter from its value *before* the cast (so an fp32-initialized model loses nothing).
    ``named_parameters()`` yields the masters under the model's names (pass this object to
    ``build_optimizer``); ``copy_grads_to_master()`` before the optimizer step sets each master's
    ``.grad`` to its parameter's gradient in fp32 (``main_grad`` when DistributedDataParallel made one);
    ``copy_master_to_model()`` after the step writes the masters back, rounded to ``dtype``.

    Raises ValueError for a dtype other than fp32/bf16/fp16; TypeError for a non-Module model.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        fn = "megacore.training.MixedPrecision"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype not in _DTYPES:
            raise ValueError(f"{fn}: dtype={dtype!r}; expected torch.float32, torch.bfloat16 or torch.float16")
        self.model, self.dtype = model, dtype
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.enabled = dtype != torch.float32
        if not self.enabled:
            self._masters = [p for _, p in self._named]
        else:
            self._masters = []
            for _, p in self._named:
                master = nn.Parameter(p.detach().to(torch.float32, copy=True))
                # which model parameter this is the master of: the parallel plan (clipping) and checkpoints
                # treat a master like its model parameter through it
                master.model_param = p
                self._masters.append(master)
        model.to(dtype)  # in place: param.data is replaced, the Parameter objects (and tags) stay

    def named_parameters(self):
        """``(name, master)`` for every trainable parameter (the model's own parameters for fp32)."""
        return zip([n for n, _ in self._named], self._masters)

    def parameters(self):
        return list(self._masters)

    def model_parameters(self):
        return [p for _, p in self._named]

    def copy_grads_to_master(self) -> None:
        """Sets each master's ``.grad`` to its parameter's gradient in fp32 (None if it has none). No-op for fp32."""
        if not self.enabled:
            return
        for (_, p), master in zip(self._named, self._masters):
            g = grad_of(p)
            master.grad = None if g is None else g.detach().to(torch.float32, copy=True)

    @torch.no_grad()
    def copy_master_to_model(self) -> None:
        """Writes the masters into the model's parameters (rounded to ``dtype``). No-op for fp32."""
        if not self.enabled:
            return
        torch._foreach_copy_([p for _, p in self._named], self._masters)

    def zero_master_grads(self) -> None:
        if self.enabled:
            for master in self._masters:
                master.grad = None

    def state_dict(self) -> dict:
        """The fp32 masters by parameter name (empty for fp32: the model's weights are the masters)."""
        if not self.enabled:
            return {}
        return {name: master.detach() for name, master in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the masters (and the model's parameters from them). An empty dict (from an fp32 run, or
        a checkpoint holding only the model) re-creates the masters from the model's current weights.
        Raises KeyError naming a missing parameter, ValueError for a shape mismatch."""
        if not self.enabled:
            return
        fn = "megacore.training.MixedPrecision.load_state_dict"
        for (name, p), master in zip(self._named, self._masters):
            if not state_dict:
                master.copy_(p.detach().float())
                continue
            if name not in state_dict:
                raise KeyError(f"{fn}: no master weight for parameter {name!r}")
            value = state_dict[name]
            if value.shape != master.shape:
                raise ValueError(f"{fn}: {name} has shape {list(value.shape)}, expected {list(master.shape)}")
            master.copy_(value)
        self.copy_master_to_model()


class DynamicLossScaler:
    """Dynamic loss scaling for fp16 (Megatron/apex style).

    ``scale(loss)`` multiplies the loss by the current scale before backward; ``unscale_(params)``
    divides the gradients (``main_grad`` or ``grad``) by it in place and returns whether any is inf/NaN,
    agreed over the tensor- and pipeline-parallel groups (data-parallel ranks already agree: their
    gradients were all-reduced), and over the data-parallel group too when ``data_parallel_sharded``
    (the ``DistributedOptimizer``'s pieces, each rank holding a part of the gradients);
    ``update(found_inf)`` then halves the scale (``backoff_factor``, never below ``min_scale``) and counts
    a skipped step on overflow, or multiplies it by ``growth_factor`` after ``growth_interval``
    consecutive clean steps. The caller skips the optimizer step on overflow.

    Raises ValueError for a non-positive or non-finite ``init_scale``, ``growth_factor`` <= 1,
    ``backoff_factor`` outside (0, 1) or ``growth_interval`` < 1.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, min_scale: float = 1.0):
        fn = "megacore.training.DynamicLossScaler"
        if not (0 < init_scale < math.inf):
            raise ValueError(f"{fn}: init_scale={init_scale} must be finite and > 0")
        if not growth_factor > 1:
            raise ValueError(f"{fn}: growth_factor={growth_factor} must be > 1")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"{fn}: backoff_factor={backoff_factor} must be in (0, 1)")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise ValueError(f"{fn}: growth_interval={growth_interval!r} must be an int >= 1")
        if not 0 < min_scale <= init_scale:
            raise ValueError(f"{fn}: min_scale={min_scale} must be in (0, init_scale]")
        self.loss_scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = growth_interval, float(min_scale)
        self.clean_steps = 0  # consecutive steps without overflow since the last change of scale
        self.skipped_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (backward through it gives scaled gradients)."""
        return loss * self.loss_scale

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.Tensor], data_parallel_sharded: bool = False) -> bool:
        """Divides every gradient by the scale in place; returns True when any gradient on any model-parallel
        rank is inf or NaN (the same answer on every rank). With ``data_parallel_sharded=True`` (the
        gradients are a ``DistributedOptimizer``'s pieces, disjoint over data-parallel ranks) the answer is
        agreed over the data-parallel group (``optim.data_parallel_group()``) too; every data-parallel rank
        must then call it."""
        grads = [g for g in (grad_of(p) for p in params) if g is not None]
        dp_group = data_parallel_group() if data_parallel_sharded else None
        device = reduction_device(grads, dp_group)
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self.loss_scale, dtype=torch.float32, device=device)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
        if state.model_parallel_is_initialized():
            for size, group in ((state.get_tensor_parallel_world_size(), state.get_tensor_parallel_group()),
                                (state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_group())):
                if size > 1:
                    found_inf = all_reduce(found_inf, group, "max")
        if dp_group is not None and dp_group.size() > 1:
            found_inf = all_reduce(found_inf, dp_group, "max")
        return bool(found_inf.item() > 0)

    def update(self, found_inf: bool) -> None:
        """Adjusts the scale after a step: back off and count a skip on overflow, grow after a clean window."""
        if found_inf:
            self.loss_scale = max(self.min_scale, self.loss_scale * self.backoff_factor)
            self.clean_steps = 0
            self.skipped_steps += 1
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.loss_scale *= self.growth_factor
                self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"loss_scale": self.loss_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the scale, its settings and the counters. Raises KeyError naming a missing key."""
        for key in ("loss_scale", "clean_steps", "skipped_steps"):
            if key not in state_dict:
                raise KeyError(f"megacore.training.DynamicLossScaler.load_state_dict: missing key {key!r}")
        self.loss_scale = float(state_dict["loss_scale"])
        self.growth_factor = float(state_dict.get("growth_factor", self.growth_factor))
        self.backoff_factor = float(state_dict.get("backoff_factor", self.backoff_factor))
        self.growth_interval = int(state_dict.get("growth_interval", self.growth_interval))
        self.min_scale = float(state_dict.get("min_scale", self.min_scale))
        self.clean_steps, self.skipped_steps = int(state_dict["clean_steps"]), int(state_dict["skipped_steps"])


__all__ = ["DynamicLossScaler", "MixedPrecision"]
