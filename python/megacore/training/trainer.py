"""The training step: micro-batches with gradient accumulation, loss scaling, clipping, the optimizer and
schedule steps.

    for each micro-batch: loss_i = loss_fn(model, batch_i); backward(scale(loss_i / n))   (no_sync but the last)
    master grads <- model grads; unscale + overflow check; clip; optimizer step; masters -> model; schedule step
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Callable, Optional

import torch
from torch import nn

from megacore._profiling import ProfileWindow, phase
from megacore.parallel import pipeline
from megacore.parallel.collectives import all_reduce
from megacore.parallel.sharding import ParallelPlan, sum_sequence_parallel_gradients
from megacore.training.optim import LRSchedule, clip_grad_norm
from megacore.training.precision import DynamicLossScaler, MixedPrecision

IGNORE_INDEX = -100
LossFn = Callable[[nn.Module, dict], torch.Tensor]
_FN = "megacore.training.Trainer.train_step"
SPIKE_WINDOW = 100  # steps of history the loss-spike check compares with
SPIKE_MIN_HISTORY = 10  # steps before the loss-spike check starts


class TrainingDivergedError(RuntimeError):
    """The run cannot go on: a non-finite loss or gradient norm, too many consecutive fp16 overflow skips,
    or a loss spike. Raised by ``Trainer.train_step`` before the optimizer step, so the weights are those
    of the last good step; ``step`` is the 1-based step that failed."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


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
        output_loss: under pipeline parallelism (a model cut with ``megacore.parallel.pipeline.cut_stage``), the
            last stage's ``output_loss(stage_output, micro_batch) -> 0-dim loss`` (the task's); default
            ``pipeline.default_output_loss``. The step then runs the 1F1B schedule (interleaved when the model
            has virtual chunks) instead of one micro-batch after the other, and ``loss_fn`` is not used.
        pipeline_timings: under pipeline parallelism, a dict the schedule adds this rank's ``wait_s`` (time
            blocked on a neighbour's activations or gradients) and ``total_s`` to on every step
            (``pipeline.forward_backward``'s ``timings``; benchmarks/pipeline.py reads it); None: not timed.
        max_skipped_steps: with a ``scaler``, how many consecutive overflow-skipped steps are tolerated (the
            scale halves on each; from 2**16 it reaches 1 in 16); one more raises TrainingDivergedError.
        loss_spike_factor: None (off), or a factor > 1: a step whose loss exceeds it times the largest loss
            of the previous ``SPIKE_WINDOW`` steps (once ``SPIKE_MIN_HISTORY`` are seen) raises
            TrainingDivergedError (Megatron's spiky-loss check uses 10).

    Health checks, as Megatron's ``check_for_nan_in_loss_and_grad``: a non-finite loss (on any rank: the
    loss is averaged over data-parallel ranks first) or, without a scaler, a non-finite gradient norm raises
    TrainingDivergedError before the optimizer step, so nothing non-finite reaches the weights.

    The step's loss is the mean of the micro-batches' losses. Deterministic on CPU: the same seed and data
    give the same losses bit for bit. Raises TypeError/ValueError for arguments of the wrong type or value.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Optional[LRSchedule],
                 precision: Optional[MixedPrecision] = None, scaler: Optional[DynamicLossScaler] = None,
                 grad_accumulation: int = 1, clip: Optional[float] = 1.0, ddp: Optional[nn.Module] = None,
                 loss_fn: Optional[LossFn] = None, max_skipped_steps: Optional[int] = None,
                 loss_spike_factor: Optional[float] = None, output_loss: Optional[Callable] = None,
                 pipeline_timings: Optional[dict] = None):
        fn = "megacore.training.Trainer"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(grad_accumulation, int) and grad_accumulation >= 1):
            raise ValueError(f"{fn}: grad_accumulation={grad_accumulation!r} must be an int >= 1")
        if clip is not None and not clip >= 0:
            raise ValueError(f"{fn}: clip={clip!r} must be >= 0 or None")
        if max_skipped_steps is not None and not (isinstance(max_skipped_steps, int) and max_skipped_steps >= 1):
            raise ValueError(f"{fn}: max_skipped_steps={max_skipped_steps!r} must be None or an int >= 1")
        if loss_spike_factor is not None and not (1 < loss_spike_factor < math.inf):
            raise ValueError(f"{fn}: loss_spike_factor={loss_spike_factor!r} must be None or a finite number > 1")
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
        self.output_loss = output_loss or pipeline.default_output_loss
        self.pipeline_timings = pipeline_timings
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.stages = pipeline.layout_of(model)  # None unless pipeline-parallel
        # The model's layout (shards, tied copies), which the gradient norm reads for the masters too.
        self.plan = ParallelPlan(model)
        self.step_count = 0
        self.max_skipped_steps, self.loss_spike_factor = max_skipped_steps, loss_spike_factor
        self.consecutive_skips = 0
        self.profile_window = ProfileWindow.from_env()  # MEGACORE_PROFILE_STEPS: see megacore/_profiling.py
        self.recent_losses: collections.deque = collections.deque(maxlen=SPIKE_WINDOW)

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
        Raises ValueError when ``len(micro_batches) != grad_accumulation``, TrainingDivergedError (before
        any weight changes) when the step fails a health check.

        Profilers see the step as ``megacore.train_step`` holding ``megacore.forward`` and
        ``megacore.backward`` per micro-batch, ``megacore.loss_sync`` and ``megacore.optimizer``
        (docs/profiling.md).
        """
        if len(micro_batches) != self.grad_accumulation:
            raise ValueError(f"megacore.training.Trainer.train_step: got {len(micro_batches)} micro-batches, "
                             f"expected grad_accumulation={self.grad_accumulation}")
        window, step = self.profile_window, self.step_count + 1
        if window is not None:
            window.before_step(step)
        with phase("megacore.train_step"):
            out = self._train_step(micro_batches, step)
        if window is not None:
            window.after_step(step)
        return out

    def _train_step(self, micro_batches: list[dict], step: int) -> dict:
        self.model.train()
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)  # the schedule's rate (layer-wise decay scales groups)
        tokens = sum(int(b["input_ids"].numel()) for b in micro_batches if isinstance(b.get("input_ids"), torch.Tensor))
        if self.stages is not None:
            loss = self._pipeline_forward_backward(micro_batches)
        else:
            loss = self._forward_backward(micro_batches)
        if self.plan.has_sequence_parallel:  # replicated parameters used on sequence shards: sum their parts
            with phase("megacore.sequence_parallel_grads"):
                sum_sequence_parallel_gradients(self.plan)

        with phase("megacore.loss_sync"):  # float() waits for the device: the step's one host sync
            if self.ddp is not None and self.ddp.data_parallel_group.size() > 1:
                dp = self.ddp.data_parallel_group
                loss = all_reduce(loss.reshape(1), dp, "avg").reshape(())
                tokens *= dp.size()
            loss = float(loss)
        try:
            self._check_loss(step, loss)
            with phase("megacore.optimizer"):  # master grads, unscale, clip, step, masters -> model
                if self.precision is not None:
                    self.precision.copy_grads_to_master()
                found_inf = self.scaler.unscale_(self.params, data_parallel_sharded=getattr(
                    self.precision, "sharded_over_data_parallel", False)) if self.scaler is not None else False
                grad_norm = float("nan")
                if not found_inf:
                    grad_norm = float(clip_grad_norm(self.params, self.clip, data_parallel_sharded=getattr(
                        self.precision, "sharded_over_data_parallel", False), plan=self.plan))
                    if not math.isfinite(grad_norm):
                        raise TrainingDivergedError(step, f"{_FN}: step {step}: the gradient norm is {grad_norm} "
                                                          f"(loss {loss:.4g}); stopping before the optimizer step, "
                                                          f"the weights are those of step {step - 1}")
                    self.optimizer.step()
                    if self.precision is not None:
                        self.precision.copy_master_to_model()
                    if self.schedule is not None:
                        self.schedule.step()
                if self.scaler is not None:
                    self.scaler.update(found_inf)
                    self._check_skips(step, found_inf)
        finally:
            self._zero_grads()
        self.step_count += 1
        self.recent_losses.append(loss)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": bool(found_inf), "tokens": tokens}

    def _scale(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """What backward starts from: the micro-batch's share of the step's mean, times the fp16 loss scale."""
        scaled = loss / n
        return self.scaler.scale(scaled) if self.scaler is not None else scaled

    def _forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """One micro-batch after the other; returns the mean loss (0-dim, detached)."""
        n, losses = len(micro_batches), []
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with phase("megacore.forward"):
                    loss = self.loss_fn(self.model, batch)
                    scaled = self._scale(loss, n)
                with phase("megacore.backward"):  # holds DDP's megacore.grad_sync on the last micro-batch
                    scaled.backward()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def _pipeline_forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """The pipeline schedule over this rank's stage; returns the step's loss (0-dim, the same on every
        pipeline rank), after summing the tied embedding's gradients over the first and last stage."""
        n = len(micro_batches)
        losses = pipeline.forward_backward(self.model, micro_batches, lambda loss: self._scale(loss, n),
                                           self.output_loss, no_sync=self.ddp.no_sync if self.ddp is not None else None,
                                           timings=self.pipeline_timings)
        pipeline.sync_tied_gradients(self.model)
        device = next(self.model.parameters()).device
        return pipeline.pipeline_loss(losses, n, device)

    def _check_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            fp16 = self.precision is not None and self.precision.dtype == torch.float16
            raise TrainingDivergedError(step, f"{_FN}: step {step}: the loss is {loss}; stopping before the optimizer "
                                              f"step (the weights are those of step {step - 1}). Lower the learning "
                                              "rate or check the data" + (", or use bfloat16: float16 overflows"
                                                                         if fp16 else ""))
        history = self.recent_losses
        if self.loss_spike_factor is not None and len(history) >= SPIKE_MIN_HISTORY:
            worst = max(history)
            if loss > self.loss_spike_factor * worst:
                raise TrainingDivergedError(step, f"{_FN}: step {step}: loss spike: {loss:.4g} is more than "
                                                  f"{self.loss_spike_factor:g} x the largest of the last "
                                                  f"{len(history)} steps ({worst:.4g}); stopping before the "
                                                  "optimizer step")

    def _check_skips(self, step: int, skipped: bool) -> None:
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if self.max_skipped_steps is not None and self.consecutive_skips > self.max_skipped_steps:
            raise TrainingDivergedError(step, f"{_FN}: step {step}: {self.consecutive_skips} consecutive steps "
                                              "skipped for fp16 overflow (non-finite gradients at every loss scale "
                                              f"down to {self.scaler.loss_scale:g}); the model does not train in float16. "
                                              "Lower the learning rate or use bfloat16")

    def state_dict(self) -> dict:
        """The trainer's own counters (the model, optimizer, schedule and scaler save their own)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step_count = int(state_dict["step_count"])


__all__ = ["IGNORE_INDEX", "Trainer", "TrainingDivergedError", "masked_mean_loss"]
