"""The training step: micro-batches with gradient accumulation, loss scaling, clipping, the optimizer and
schedule steps.

    for each micro-batch: loss_i = loss_fn(model, batch_i); backward(scale(loss_i / n))   (no_sync but the last)
    master grads <- model grads; unscale + overflow check; clip; optimizer step; masters -> model; schedule step
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from megacore.parallel.collectives import all_reduce
from megacore.training.optim import LRSchedule, clip_grad_norm
from megacore.training.precision import DynamicLossScaler, MixedPrecision

IGNORE_INDEX = -100
LossFn = Callable[[nn.Module, dict], torch.Tensor]


def masked_mean_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The causal-LM loss of one micro-batch: ``model(batch["input_ids"] [b, s], labels=batch["labels"] [b, s])``
    gives the per-token loss ``[b, s]`` (fp32); returns its mean over the tokens whose label is not -100
    (a 0-dim fp32 tensor; 0 when every label is ignored). ``position_ids`` is passed on when present.
    Raises KeyError naming a missing batch key."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise KeyError(f"megacore.training.masked_mean_loss: the batch has no {key!r} "
                           f"(keys: {', '.join(sorted(batch))})")
    labels = batch["labels"]
    kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    per_token = model(batch["input_ids"], labels=labels, **kwargs)  # [b, s] fp32
    mask = (labels != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class Trainer:
    """One optimizer step per ``train_step(micro_batches)``.

    Args:
        model: the model to run (the DistributedDataParallel wrapper when data-parallel).
        optimizer: e.g. ``build_optimizer(precision or model, ...)``: it must step on the master weights
            when ``precision`` is given.
        schedule: the ``LRSchedule`` stepped after every applied (not skipped) optimizer step.
        precision: a ``MixedPrecision`` for bf16/fp16 models (fp32 masters); None for fp32.
        scaler: a ``DynamicLossScaler`` (fp16); None: no loss scaling and no overflow skipping.
        grad_accumulation: micro-batches per step; ``train_step`` must get exactly this many.
        clip: the global-norm clipping threshold; 0 or None: report the norm without clipping.
        ddp: the DistributedDataParallel wrapper (``no_sync()`` on all but the last micro-batch; the
            reported loss is averaged over data-parallel ranks); None when not data-parallel.
        loss_fn: ``loss_fn(model, micro_batch) -> 0-dim loss``; default ``masked_mean_loss`` (causal LM).

    The step's loss is the mean of the micro-batches' losses. Deterministic on CPU: the same seed and data
    give the same losses bit for bit. Raises TypeError/ValueError for arguments of the wrong type or value.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Optional[LRSchedule],
                 precision: Optional[MixedPrecision] = None, scaler: Optional[DynamicLossScaler] = None,
                 grad_accumulation: int = 1, clip: Optional[float] = 1.0, ddp: Optional[nn.Module] = None,
                 loss_fn: Optional[LossFn] = None):
        fn = "megacore.training.Trainer"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(grad_accumulation, int) and grad_accumulation >= 1):
            raise ValueError(f"{fn}: grad_accumulation={grad_accumulation!r} must be an int >= 1")
        if clip is not None and not clip >= 0:
            raise ValueError(f"{fn}: clip={clip!r} must be >= 0 or None")
        if precision is not None and precision.dtype == torch.float16 and scaler is None:
            raise ValueError(f"{fn}: fp16 training needs a DynamicLossScaler (scaler=None): fp16 gradients "
                             "underflow without loss scaling")
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if precision is not None and precision.enabled:
            masters = precision.parameters()
            if not all(id(p) in optimized for p in masters):
                raise ValueError(f"{fn}: the optimizer does not step on the precision's fp32 master weights; "
                                 "build it with build_optimizer(precision, ...)")
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.precision, self.scaler, self.ddp = precision, scaler, ddp
        self.grad_accumulation, self.clip = grad_accumulation, clip or 0.0
        self.loss_fn = loss_fn or masked_mean_loss
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.step_count = 0

    def _zero_grads(self) -> None:
        if self.ddp is not None:
            self.ddp.zero_grad(set_to_none=False)  # keep the bucket views: no re-copy next backward
        else:
            self.model.zero_grad(set_to_none=True)
        if self.precision is not None:
            self.precision.zero_master_grads()

    def train_step(self, micro_batches: list[dict]) -> dict:
        """Runs forward/backward on each micro-batch (a dict of tensors ``loss_fn`` reads, e.g. ``input_ids``
        and ``labels`` ``[b, s]``) and one optimizer step.

        Returns ``{"loss": float (mean over micro-batches, and over data-parallel ranks), "grad_norm": float
        (before clipping; nan on a skipped step), "lr": float (the rate this step used), "skipped": bool
        (fp16 overflow: no update), "tokens": int (input tokens this step over all data-parallel ranks)}``.
        Raises ValueError when ``len(micro_batches) != grad_accumulation``.
        """
        if len(micro_batches) != self.grad_accumulation:
            raise ValueError(f"megacore.training.Trainer.train_step: got {len(micro_batches)} micro-batches, "
                             f"expected grad_accumulation={self.grad_accumulation}")
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        n = len(micro_batches)
        losses, tokens = [], 0
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                loss = self.loss_fn(self.model, batch)
                scaled = loss / n
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            losses.append(loss.detach())
            ids = batch.get("input_ids")
            tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0

        if self.precision is not None:
            self.precision.copy_grads_to_master()
        found_inf = self.scaler.unscale_(self.params) if self.scaler is not None else False
        if found_inf:
            grad_norm = float("nan")
        else:
            grad_norm = float(clip_grad_norm(self.params, self.clip))
            self.optimizer.step()
            if self.precision is not None:
                self.precision.copy_master_to_model()
            if self.schedule is not None:
                self.schedule.step()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        self._zero_grads()
        self.step_count += 1

        loss = torch.stack(losses).mean()
        if self.ddp is not None:
            dp = self.ddp.data_parallel_group
            if dp.size() > 1:
                loss = all_reduce(loss.reshape(1), dp, "avg").reshape(())
                tokens *= dp.size()
        return {"loss": float(loss), "grad_norm": grad_norm, "lr": lr, "skipped": bool(found_inf), "tokens": tokens}

    def state_dict(self) -> dict:
        """The trainer's own counters (the model, optimizer, schedule and scaler save their own)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step_count = int(state_dict["step_count"])


__all__ = ["IGNORE_INDEX", "Trainer", "masked_mean_loss"]
