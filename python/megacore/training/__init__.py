"""megacore.training: the optimizer and learning-rate schedule, gradient clipping across tensor-parallel
ranks, mixed precision (fp32 master weights, dynamic loss scaling) and the training step.

Typical use (one process, or every rank under torchrun)::

    model = build("gpt-tiny", ...)                       # fp32 parameters
    precision = MixedPrecision(model, torch.bfloat16)    # casts the model, keeps fp32 master weights
    ddp = DistributedDataParallel(model, grad_dtype=torch.float32)   # only when data-parallel
    optimizer = build_optimizer(precision, lr=6e-4)      # steps on the master weights
    schedule = LRSchedule(optimizer, max_lr=6e-4, min_lr=6e-5, warmup_steps=100, total_steps=5000)
    trainer = Trainer(ddp or model, optimizer, schedule, precision=precision, grad_accumulation=4, ddp=ddp)
    metrics = trainer.train_step(micro_batches)          # {"loss", "grad_norm", "lr", "skipped", "tokens"}
    save_checkpoint("ckpt", step, model, optimizer, extra={"schedule": schedule.state_dict()}, keep_last=3)

With data parallelism the optimizer state can be sharded over the data-parallel ranks (ZeRO-1,
``distributed_optimizer.py``)::

    ddp = DistributedDataParallel(model, grad_dtype=torch.float32, reduce_scatter=True)
    optimizer = precision = DistributedOptimizer(ddp, precision, lr=6e-4)   # 1/DP of masters and moments
    trainer = Trainer(ddp, optimizer, schedule, precision=precision, grad_accumulation=4, ddp=ddp)

Checkpoints (``checkpoint.py``) hold full, merged weights and optimizer moments, so they load at any
tensor-parallel size; ``generate.py`` decodes with a KV cache (``seq2seq_generate.py``: an
encoder-decoder's greedy and beam search); ``evaluate.py`` gives perplexity and a
LAMBADA-style last-word accuracy; ``classification_metrics.py`` the metrics of fine-tuned classifiers (accuracy,
macro-F1, Matthews' correlation; MSE, Pearson, Spearman).
"""

from megacore.training.checkpoint import load_checkpoint, save_checkpoint
from megacore.training.classification_metrics import classification_metrics, regression_metrics
from megacore.training.distributed_optimizer import DistributedOptimizer
from megacore.training.evaluate import last_word_accuracy, perplexity
from megacore.training.generate import generate
from megacore.training.optim import LRSchedule, build_optimizer, clip_grad_norm, parameter_groups
from megacore.training.precision import DynamicLossScaler, MixedPrecision
from megacore.training.seq2seq_generate import generate_seq2seq
from megacore.training.trainer import Trainer, TrainingDivergedError, masked_mean_loss

__all__ = [
    "DistributedOptimizer",
    "DynamicLossScaler",
    "LRSchedule",
    "MixedPrecision",
    "Trainer",
    "TrainingDivergedError",
    "build_optimizer",
    "classification_metrics",
    "clip_grad_norm",
    "generate",
    "generate_seq2seq",
    "last_word_accuracy",
    "load_checkpoint",
    "masked_mean_loss",
    "parameter_groups",
    "perplexity",
    "regression_metrics",
    "save_checkpoint",
]
