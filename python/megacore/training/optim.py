"""AdamW with weight-decay exclusions, the learning-rate schedule, and gradient clipping by the global norm
across tensor-parallel ranks."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from megacore.parallel import state
from megacore.parallel.collectives import all_reduce
from megacore.parallel.distributed import grad_of

if TYPE_CHECKING:
    from megacore.parallel.sharding import ParallelPlan

NO_DECAY = ("bias", "norm", "embedding")
DECAYS = ("cosine", "linear", "constant")


def _named_parameters(fn: str, model):
    if not hasattr(model, "named_parameters"):
        raise TypeError(f"megacore.training.{fn}: model must be an nn.Module or have named_parameters() "
                        f"(a MixedPrecision), got {type(model).__name__}")
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _excluded(name: str, no_decay: Sequence[str]) -> bool:
    components = name.lower().split(".")
    return any(pattern.lower() in component for pattern in no_decay for component in components)


def parameter_groups(model, weight_decay: float = 0.1, no_decay: Sequence[str] = NO_DECAY,
                     layer_lr_decay: float = 1.0) -> list[dict]:
    """The two AdamW parameter groups of ``model``: ``[{"params": decayed, "weight_decay": weight_decay,
    "names": [...]}, {"params": excluded, "weight_decay": 0.0, "names": [...]}]`` (empty groups dropped).

    With ``layer_lr_decay`` < 1 (layer-wise learning-rate decay, ELECTRA's fine-tuning recipe) each of the two is
    split further by :func:`layer_lr_scales`' factor, kept in the group as ``"lr_scale"`` (``LRSchedule`` sets
    ``lr = schedule rate x lr_scale``); groups are ordered by (decay, scale descending).

    The rule, exactly: a parameter's qualified name (``model.named_parameters()``, e.g.
    ``decoder.layers.0.attention_norm.weight``) is split on ``.``; the parameter is excluded from weight
    decay when any pattern of ``no_decay`` occurs, case-insensitively, as a substring of any component. With
    the default ``("bias", "norm", "embedding")`` that excludes every bias, every norm's weight and bias
    (``attention_norm``, ``mlp_norm``, ``final_norm``, ``embedding.norm``) and every table under
    ``embedding`` (word, position, token type); linear weights (including ELECTRA's ``projection``) decay.
    ``no_decay=()`` decays everything. Parameters with ``requires_grad=False`` are left out.
    """
    if isinstance(no_decay, str):
        raise TypeError("megacore.training.parameter_groups: no_decay must be a sequence of name patterns, "
                        f"got the string {no_decay!r} (write ({no_decay!r},))")
    named = _named_parameters("parameter_groups", model)
    scales = layer_lr_scales([n for n, _ in named], layer_lr_decay) if layer_lr_decay != 1.0 else {}
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in named:
        excluded = _excluded(name, no_decay)
        scale = scales.get(name, 1.0)
        group = groups.setdefault((excluded, -scale), {"params": [], "weight_decay": 0.0 if excluded else weight_decay,
                                                       "names": []})
        if scales:
            group["lr_scale"] = scale
        group["params"].append(p)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_lr_scales(names: Sequence[str], layer_lr_decay: float) -> dict[str, float]:
    """Each parameter's learning-rate factor under layer-wise decay, as ELECTRA's fine-tuning code sets it
    (``_get_layer_lrs`` in google-research/electra's ``model/optimization.py``): with ``L`` transformer layers,
    depth 0 for the embeddings (``embedding.*``, ELECTRA's ``*.projection.*``), ``i + 1`` for layer ``i``
    (``...layers.{i}.*``), ``L + 2`` for everything else (the task's head, a pooler, a final norm), and the factor
    ``layer_lr_decay ** (L + 2 - depth)``: 1 for the head, ``d ** (L + 2)`` for the embeddings. Layer indices are
    the model's global ones (a pipeline stage's names keep them), but ``L`` counts the layers named here.
    Raises ValueError for a decay outside (0, 1]."""
    if isinstance(layer_lr_decay, bool) or not isinstance(layer_lr_decay, (int, float)) or not 0 < layer_lr_decay <= 1:
        raise ValueError(f"megacore.training.layer_lr_scales: layer_lr_decay={layer_lr_decay!r} must be in (0, 1]")
    layers = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    depth_of_head = (max(layers) + 1 if layers else 0) + 2
    out = {}
    for name in names:
        m = _LAYER.search(name)
        if m:
            depth = int(m.group(1)) + 1
        elif name.startswith("embedding.") or ".projection." in name or name.startswith("projection."):
            depth = 0
        else:
            depth = depth_of_head
        out[name] = float(layer_lr_decay) ** (depth_of_head - depth)
    return out


def check_adamw_arguments(fn: str, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> None:
    """Raises ValueError, naming ``fn``, for ``lr`` < 0, ``weight_decay`` < 0, betas outside [0, 1) or
    ``eps`` <= 0 (the checks of ``build_optimizer`` and ``DistributedOptimizer``)."""
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"{fn}: lr={lr!r} must be a number >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"{fn}: weight_decay={weight_decay!r} must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{fn}: betas={betas!r} must be two numbers in [0, 1)")
    if not eps > 0:
        raise ValueError(f"{fn}: eps={eps!r} must be > 0")


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes every tensor of ``params`` (device and dtype)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
               for p in params)


def build_optimizer(model, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, no_decay: Sequence[str] = NO_DECAY,
                    layer_lr_decay: float = 1.0) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``model``'s parameters in two groups (see ``parameter_groups`` for which
    are excluded from weight decay).

    ``model`` is an ``nn.Module`` (a DistributedDataParallel wrapper is fine) or a ``MixedPrecision``,
    whose ``named_parameters()`` are the fp32 master weights the optimizer must step on. Uses torch's fused
    kernel when every parameter's device and dtype support it (CPU and CUDA, fp32/fp16/bf16), else the
    ``foreach`` implementation. Each group keeps its ``names`` (used by checkpoints and logs).
    ``layer_lr_decay`` < 1: layer-wise learning-rate decay (``parameter_groups``, ``layer_lr_scales``).

    Raises ValueError for ``lr`` < 0, ``weight_decay`` < 0, betas outside [0, 1) or ``eps`` <= 0, and when
    the model has no trainable parameter; TypeError for a model without ``named_parameters``.
    """
    fn = "megacore.training.build_optimizer"
    check_adamw_arguments(fn, lr, weight_decay, betas, eps)
    groups = parameter_groups(model, weight_decay, no_decay, layer_lr_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{fn}: the model has no parameter that requires grad")
    fused = fused_supported(params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def _check_schedule(fn: str, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int, decay: str) -> None:
    if decay not in DECAYS:
        raise ValueError(f"{fn}: decay={decay!r}; expected one of {', '.join(DECAYS)}")
    if not (math.isfinite(max_lr) and math.isfinite(min_lr)):
        raise ValueError(f"{fn}: need finite rates, got min_lr={min_lr}, max_lr={max_lr}")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"{fn}: need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not (isinstance(warmup_steps, int) and isinstance(total_steps, int)):
        raise TypeError(f"{fn}: warmup_steps and total_steps must be ints, got {warmup_steps!r}, {total_steps!r}")
    if not 0 <= warmup_steps <= total_steps or total_steps < 1:
        raise ValueError(f"{fn}: need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                         f"warmup_steps={warmup_steps}, total_steps={total_steps}")


class LRSchedule:
    """Linear warmup from 0 to ``max_lr`` over ``warmup_steps``, then ``decay`` to ``min_lr`` at
    ``total_steps``, constant ``min_lr`` after.

    The learning rate of step ``t`` (0-based; ``lr`` is the rate the next ``optimizer.step()`` uses):

    - ``t < warmup_steps``: ``max_lr * (t + 1) / warmup_steps``
    - then, with ``progress = (t - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
      cosine: ``min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * progress))``;
      linear: ``max_lr - (max_lr - min_lr) * progress``; constant: ``max_lr``.

    Construction sets every param group's ``lr`` to step 0's rate (times the group's ``lr_scale`` when it has one:
    layer-wise decay); ``step()`` advances one optimizer step.
    Raises ValueError for negative or inconsistent values (``min_lr > max_lr``, ``warmup_steps >
    total_steps``) or an unknown ``decay``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float = 0.0,
                 warmup_steps: int = 0, total_steps: int = 1, decay: str = "cosine"):
        _check_schedule("megacore.training.LRSchedule", float(max_lr), float(min_lr), warmup_steps, total_steps, decay)
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.total_steps, self.decay = warmup_steps, total_steps, decay
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based optimizer step ``step``."""
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return self.max_lr
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span)) if span > 0 else 1.0
        if self.decay == "linear":
            return self.max_lr - (self.max_lr - self.min_lr) * progress
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay: parameter_groups' factor

    def step(self) -> None:
        """Advances one optimizer step and sets the new rate on every param group."""
        self.step_count += 1
        self._apply()

    def reshape(self, max_lr: Optional[float] = None, min_lr: Optional[float] = None,
                warmup_steps: Optional[int] = None, total_steps: Optional[int] = None) -> None:
        """Changes the curve from the current step on (a resumed run that trains longer, or one told to
        take new rates); the position (``step_count``) stays. Raises ValueError like the constructor."""
        max_lr = self.max_lr if max_lr is None else float(max_lr)
        min_lr = self.min_lr if min_lr is None else float(min_lr)
        warmup_steps = self.warmup_steps if warmup_steps is None else warmup_steps
        total_steps = self.total_steps if total_steps is None else total_steps
        _check_schedule("megacore.training.LRSchedule.reshape", max_lr, min_lr, warmup_steps, total_steps, self.decay)
        self.max_lr, self.min_lr, self.warmup_steps, self.total_steps = max_lr, min_lr, warmup_steps, total_steps
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps, "decay": self.decay}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the position; the shape (rates, steps, decay) is taken from the checkpoint too, so a
        resumed run continues the same curve. Raises KeyError naming a missing key."""
        for key in ("step_count", "max_lr", "min_lr", "warmup_steps", "total_steps", "decay"):
            if key not in state_dict:
                raise KeyError(f"megacore.training.LRSchedule.load_state_dict: missing key {key!r}")
        self.step_count = int(state_dict["step_count"])
        self.max_lr, self.min_lr = float(state_dict["max_lr"]), float(state_dict["min_lr"])
        self.warmup_steps, self.total_steps = int(state_dict["warmup_steps"]), int(state_dict["total_steps"])
        self.decay = state_dict["decay"]
        self._apply()


def data_parallel_group() -> "dist.ProcessGroup":
    """The group data-parallel ranks reduce over: megacore.parallel's data-parallel group when
    ``initialize_model_parallel`` was called, else the default group (DistributedDataParallel's default)."""
    return state.get_data_parallel_group() if state.model_parallel_is_initialized() else dist.group.WORLD


def reduction_device(grads: list[torch.Tensor], group) -> torch.device:
    """Where a norm or overflow flag is reduced: the gradients' device; with no local gradient (a
    data-parallel rank whose shard holds no parameter), the device the group's backend communicates on."""
    if grads:
        return grads[0].device
    if group is not None and torch.cuda.is_available() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def clip_grad_norm(params, max_norm: float, data_parallel_sharded: bool = False,
                   plan: Optional["ParallelPlan"] = None) -> torch.Tensor:
    """Scales the gradients in place so that their global L2 norm is at most ``max_norm``; returns the norm
    before clipping (a 0-dim fp32 tensor, the same on every tensor-parallel rank).

    ``params``: a model (an nn.Module: its parameters, laid out as its ``ParallelPlan`` says), or tensors
    with ``plan``, the model's ``megacore.parallel.sharding.ParallelPlan`` (which also knows fp32 masters and
    distributed-optimizer pieces by the ``model_param`` they name). The norm is the whole model's: shards
    are summed over the tensor-parallel group; replicated parameters (``sequence_parallel`` ones included:
    their user already summed their gradient) are counted once. Without
    ``data_parallel_sharded`` there is no data-parallel reduction: after DistributedDataParallel the
    gradients are identical across data-parallel ranks. With ``data_parallel_sharded=True`` (the
    ``DistributedOptimizer``'s pieces: each data-parallel rank holds a disjoint part of the gradients) the
    squared norms are summed over the data-parallel group too (``data_parallel_group()``), so every rank
    gets the whole model's norm; every data-parallel rank must then call it. Reads ``p.main_grad`` when
    present, else ``p.grad``; parameters without a gradient are skipped. ``max_norm <= 0`` or ``inf``
    computes the norm without clipping. A non-finite norm leaves the gradients as they are (the loss
    scaler's overflow check should catch it first). Under pipeline
    parallelism the squared norms are summed over the stages; a stage's tied copy (the last stage's word
    embedding, ``ParallelPlan.is_tied_copy``) is clipped but counted on its owner's stage only.

    Raises ValueError for a NaN ``max_norm``, and for tensors without ``plan`` under tensor or pipeline
    parallelism (shards could not be told from replicated parameters).
    """
    from megacore.parallel.sharding import ParallelPlan

    if isinstance(params, torch.nn.Module):
        plan = plan or ParallelPlan(params)
        params = list(params.parameters())
    if isinstance(params, torch.Tensor):
        params = [params]
    max_norm = float(max_norm)
    if math.isnan(max_norm):
        raise ValueError("megacore.training.clip_grad_norm: max_norm is NaN")
    if plan is None and state.model_parallel_is_initialized() and (
            state.get_tensor_parallel_world_size() > 1 or state.get_pipeline_parallel_world_size() > 1):
        raise ValueError("megacore.training.clip_grad_norm: under tensor or pipeline parallelism pass the model "
                         "(clip_grad_norm(model, ...)) or plan=ParallelPlan(model): shards must be told from "
                         "replicated parameters")
    params = [p for p in params if grad_of(p) is not None]
    tp_world, tp_rank = 1, 0
    if state.model_parallel_is_initialized():
        tp_world, tp_rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
    dp_group = data_parallel_group() if data_parallel_sharded else None
    device = reduction_device([grad_of(p) for p in params[:1]], dp_group)
    # Squared sums: sharded params on every rank; replicated ones only on tensor-parallel rank 0, so that
    # one all-reduce over the group counts each exactly once.
    counted_params = [p for p in params if plan is None or not plan.is_tied_copy(p)]
    sharded = [grad_of(p) for p in counted_params if plan is not None and plan.is_sharded(p)]
    replicated = [grad_of(p) for p in counted_params if plan is None or not plan.is_sharded(p)]
    total = torch.zeros((), dtype=torch.float32, device=device)
    counted = sharded + (replicated if tp_rank == 0 else [])
    if counted:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in counted])
        total = torch.stack(norms).pow(2).sum()
    if tp_world > 1:
        total = all_reduce(total.reshape(1), state.get_tensor_parallel_group()).reshape(())
    if dp_group is not None and dp_group.size() > 1:
        total = all_reduce(total.reshape(1), dp_group).reshape(())
    if state.model_parallel_is_initialized() and state.get_pipeline_parallel_world_size() > 1:
        total = all_reduce(total.reshape(1), state.get_pipeline_parallel_group()).reshape(())
    norm = total.sqrt()
    if 0 < max_norm < math.inf and params and torch.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            torch._foreach_mul_([grad_of(p) for p in params], coef)
    return norm


__all__ = ["LRSchedule", "build_optimizer", "check_adamw_arguments", "clip_grad_norm", "data_parallel_group",
           "fused_supported", "grad_of", "layer_lr_scales", "parameter_groups", "NO_DECAY"]
