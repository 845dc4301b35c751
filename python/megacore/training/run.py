"""``megacore train``: one command from text to a trained, checkpointed model.

    megacore train                                   # gpt-tiny on the embedded Austen corpus, CPU, < 10 min
    megacore train --model gpt2-small --data PREFIX --tensor-parallel-size 2 ...   (under torchrun)

With no ``--data`` the embedded corpus is prepared once into ``--cache-dir`` (``corpus.py``; *Persuasion* held
out for validation). The run directory (``--output``) gets ``train_config.json``, ``metrics.jsonl`` (one JSON
object per logged step and per evaluation), ``loss.png`` when matplotlib is installed, TensorBoard events when
tensorboard is (``metrics.py``), and ``checkpoints/``. A checkpoint's ``extra`` holds what
:func:`model_from_checkpoint` needs to rebuild the model and find the tokenizer, so ``megacore generate`` /
``megacore evaluate`` take just the checkpoint directory (``resume.py``).

:func:`train` is the loop, the same for every model family: what differs (datasets, batches, the loss,
evaluation, the final report) is the preset's task (``tasks.py``): ``--model gpt-*`` trains a causal LM
(validation perplexity, against a unigram baseline); ``--model bert-*`` / ``roberta-*`` masked-LM pretraining
(with NSP for BERT's presets; reports MLM accuracy); ``--model electra-*`` ELECTRA pretraining (reports the
discriminator's accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from megacore._files import atomic_write_text
from megacore._profiling import phase
from megacore.training.config import TrainConfig, load_config_file, parse_config
from megacore.training.corpus import MASKED_LM_UNITS, embedded_corpus, embedded_corpus_wordpiece
from megacore.training.corpus import is_main_process as _is_main
from megacore.training.metrics import MetricsLog, naming, plot_loss, progress_bar
from megacore.training.resume import (DTYPES, TOKENIZER_DIR, data_segments, evaluate_checkpoint, family_of_checkpoint,
                                      model_class_name, model_from_checkpoint, restore_training_state, resume_point)
from megacore.training.tasks import Task, to_device, unigram_perplexity
from megacore.training.trainer import TrainingDivergedError

_FN = "megacore train"


# ---- set-up ---------------------------------------------------------------------------------------------------


def _init_distributed(config: TrainConfig):
    """torch.distributed and megacore's grid under torchrun (megacore.parallel.launch); the ParallelState, or
    None for a single process with tensor_parallel_size 1."""
    from megacore.parallel.launch import init_from_torchrun

    return init_from_torchrun(config.tensor_parallel_size, config.pipeline_parallel_size,
                              config.distributed_timeout_minutes, _FN)


def _train_device() -> torch.device:
    """Where ``megacore train`` trains: this process's GPU when CUDA is available (torchrun's LOCAL_RANK),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _writable_directory(path: str, what: str) -> None:
    """Creates ``path`` if needed and proves it writable by writing a file there (permission bits do not
    tell for root, a read-only mount or a full quota); ValueError naming ``what`` otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{_FN}: {what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{_FN}: {what} {path} is not writable ({e.strerror or e})") from None


def _positions(config: TrainConfig, log) -> int:
    """The position-table size: the preset's (or --model-overrides'), which --seq-len must not exceed for
    learned positions; rotary positions grow with --seq-len (said in the log)."""
    from megacore.models.registry import preset_config

    preset = preset_config(config.model)
    positions = config.model_overrides.get("max_position_embeddings", preset.max_position_embeddings)
    kind = config.model_overrides.get("position_embedding_type", preset.position_embedding_type)
    if config.seq_len > positions:
        if kind == "learned_absolute":
            raise ValueError(f"{_FN}: --seq-len {config.seq_len} exceeds {config.model}'s {positions} learned "
                             f"positions; pass --model-overrides '{{\"max_position_embeddings\": {config.seq_len}}}' "
                             "to train a larger position table")
        log(f"megacore train: --seq-len {config.seq_len} exceeds {config.model}'s {positions} positions; the rotary "
            f"tables are built for {config.seq_len}")
        positions = config.seq_len
    return positions


def _check_pipeline_layout(config: TrainConfig) -> None:
    """ValueError, before anything is prepared, for a pipeline layout the model cannot take: its layers must
    divide into --pipeline-parallel-size x --virtual-pipeline-parallel-size equal stages."""
    from megacore.models.registry import preset_config

    pp, vp = config.pipeline_parallel_size, config.virtual_pipeline_parallel_size
    if vp > 1 and pp == 1:
        raise ValueError(f"{_FN}: --virtual-pipeline-parallel-size {vp} needs --pipeline-parallel-size > 1")
    if pp == 1:
        return
    preset = preset_config(config.model, **config.model_overrides)
    layers = preset.num_layers + (getattr(preset, "num_decoder_layers", None) or 0)  # T5: encoder then decoder
    if layers % (pp * vp):
        stages = f"--pipeline-parallel-size {pp}" + (f" x --virtual-pipeline-parallel-size {vp}" if vp > 1 else "")
        raise ValueError(f"{_FN}: {config.model} has {layers} layers, which do not divide into {stages} equal "
                         "stages; pick sizes whose product divides the layers (or --model-overrides "
                         "'{\"num_layers\": N}')")


def _pretrained(config: TrainConfig):
    """(step directory, extra) of ``config.pretrained`` (a checkpoint of ``megacore train``), or None. Raises
    ValueError when it was trained as another model than ``config.model`` or with --model-overrides given."""
    from megacore.training.checkpoint import resolve_checkpoint
    from megacore.training.resume import _read_extra

    if config.pretrained is None:
        return None
    step_dir = resolve_checkpoint(config.pretrained, "train")
    extra = _read_extra(step_dir, "train")
    if extra["preset"] != config.model:
        raise ValueError(f"{_FN}: --pretrained {config.pretrained} is a {extra['preset']} checkpoint, but --model is "
                         f"{config.model} (leave --model out, or pass --model {extra['preset']})")
    if config.model_overrides:
        raise ValueError(f"{_FN}: --model-overrides with --pretrained: the checkpoint fixes the model's shape")
    return step_dir, extra


def _pretrained_model(pretrained, overrides: dict, load: bool):
    """The model of a pretrained checkpoint (its config, with the run-time fields of ``overrides``: dropout,
    recompute, the parallel layout), with its weights when ``load``. Raises ValueError when the run's tokenizer
    is not the checkpoint's size."""
    from megacore.training.checkpoint import load_checkpoint
    from megacore.training.resume import model_class_of

    step_dir, extra = pretrained
    model_cls = model_class_of(extra)
    fields = {k: v for k, v in extra["model_config"].items() if k != "params_dtype"}
    if fields["vocab_size"] != overrides["vocab_size"]:
        raise ValueError(f"{_FN}: the tokenizer has {overrides['vocab_size']} tokens, the pretrained model "
                         f"{fields['vocab_size']}")
    for key in ("hidden_dropout", "attention_dropout", "recompute", "tensor_parallel", "sequence_parallel"):
        fields[key] = overrides[key]
    from megacore.models import ModelConfig

    model = model_cls(getattr(model_cls, "config_class", ModelConfig)(**fields))
    if load:
        load_checkpoint(step_dir, model, restore_rng=False)
    return model


# ---- the run --------------------------------------------------------------------------------------------------


def train(config: TrainConfig, log=print, explicit: Optional[set] = None) -> dict:
    """Runs ``megacore train``; returns the final metrics: the last validation record (``step``,
    ``valid_loss`` and the task's metric), the task's ``final_metrics`` (GPT: the unigram baseline),
    ``tokens_per_second`` and ``checkpoint`` (the last step directory).

    A run whose ``output`` holds checkpoints resumes from the newest complete one: options in ``explicit``
    (the ones this invocation gave; None: all of ``config``) replace the checkpoint's where a resume may
    change them (config.resume_config), the others continue as saved. A run already at its last step returns
    ``{"checkpoint": ..., "step": ..., "already_trained": True}`` without training or saving.

    Raises ValueError / FileNotFoundError for bad options or data, TrainingDivergedError when the run
    diverges (nothing is saved from that step), CheckpointSaveError when a checkpoint cannot be written.
    """
    from megacore._machine import auto_dtype
    from megacore.data import PretrainingSampler
    from megacore.models.registry import PRESETS, build
    from megacore.parallel import DistributedDataParallel, report_stalled_ranks
    from megacore.training import DistributedOptimizer, LRSchedule, MixedPrecision, Trainer, build_optimizer
    from megacore.training.checkpoint import remove_stale_temporaries, save_checkpoint
    from megacore.training.precision import DynamicLossScaler

    if not isinstance(config, TrainConfig):
        raise TypeError(f"{_FN}: config must be a TrainConfig, got {type(config).__name__}")
    if config.model not in PRESETS and config.hf_model is None:
        raise ValueError(f"{_FN}: unknown --model {config.model!r}; known: {', '.join(sorted(PRESETS))}")
    out = Path(config.output)
    ckpt_root = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{_FN}: --output {out} exists and is not a directory")
    main = _is_main()
    quiet_log = log if main else (lambda m: None)
    device = _train_device()
    # --dtype auto: what this machine computes natively, on the device the model trains on.
    auto = auto_dtype(device) if config.dtype == "auto" else None
    config, step, resumed_extra, resumed_dir = resume_point(ckpt_root, config, explicit, quiet_log, auto)
    dtype_shown = config.dtype
    if auto is not None:  # the run, its checkpoints and train_config.json record the resolved dtype
        if config.dtype == "auto":
            config = dataclasses.replace(config, dtype=auto[0])
        dtype_shown = (f"{config.dtype} (auto: {auto[1]})" if config.dtype == auto[0] else
                       f"{config.dtype} (the checkpoint's; auto would choose {auto[0]}: {auto[1]})")
    if config.model not in PRESETS and config.hf_model is None:  # the checkpoint's model
        raise ValueError(f"{_FN}: the checkpoint's model {config.model!r} is not a known preset")
    if step >= config.train_steps:
        quiet_log(f"megacore train: {out} is already trained to step {step} (--train-steps {config.train_steps}); "
                  "nothing to do. Pass a larger --train-steps to train further.")
        return {"checkpoint": resumed_dir, "step": step, "already_trained": True}
    if config.hf_model is not None and config.pipeline_parallel_size > 1:
        raise ValueError(f"{_FN}: --hf-model with --pipeline-parallel-size > 1 is not supported yet")
    positions = _positions(config, quiet_log) if config.hf_model is None else None
    _check_pipeline_layout(config)
    _writable_directory(str(out), "--output")
    _writable_directory(config.cache_dir, "--cache-dir")
    pretrained = _pretrained(config)
    if config.hf_model is not None:
        from megacore.training.hf_source import hf_meta_model

        start = hf_meta_model(config.hf_model)
    else:
        start = build(config.model, device="meta")
    task = Task.for_run(config.task, config.task_options, start)
    state = _init_distributed(config)
    tp, dp = (state.tensor_parallel_size, state.data_parallel_size) if state else (1, 1)
    pp, vp = config.pipeline_parallel_size, config.virtual_pipeline_parallel_size
    dp_rank = state.data_parallel_rank if state else 0
    per_step = config.micro_batch_size * dp
    if config.global_batch_size % per_step:
        raise ValueError(f"{_FN}: --global-batch-size {config.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {config.micro_batch_size} x data-parallel size {dp}")
    accumulation = config.global_batch_size // per_step
    if vp > 1 and accumulation % pp:
        raise ValueError(f"{_FN}: --virtual-pipeline-parallel-size {vp} (the interleaved schedule) needs the "
                         f"micro-batches per step, --global-batch-size {config.global_batch_size} / (--micro-batch-size "
                         f"{config.micro_batch_size} x data-parallel size {dp}) = {accumulation}, to be a multiple of "
                         f"--pipeline-parallel-size {pp}")
    if main:
        for path in remove_stale_temporaries(ckpt_root):  # a killed or failed save's leftovers, before any write
            quiet_log(f"megacore train: removed {path}, left by an interrupted checkpoint save")

    # The data position, in samples: exact across resumes, whatever the batch size was.
    consumed, segments = data_segments(resumed_extra, config, step)

    torch.manual_seed(config.seed)
    data = task.datasets(config, dp, segments, quiet_log)
    overrides = dict(config.model_overrides, **({} if positions is None else {"max_position_embeddings": positions}))
    overrides.update(vocab_size=data.tokenizer.vocab_size, hidden_dropout=config.hidden_dropout,
                     attention_dropout=config.attention_dropout, recompute=config.recompute,
                     tensor_parallel=state is not None, sequence_parallel=config.sequence_parallel)
    if config.hf_model is not None:  # the Hugging Face model, with this run's dropout, recompute and layout
        from megacore.training.hf_source import hf_model

        model = hf_model(config.hf_model, overrides)
    elif pretrained is None:
        model = build(config.model, **overrides)  # drawn whole on CPU: the same weights on every device and layout
    else:  # the pretrained checkpoint's model, with this run's dropout, recompute and layout
        model = _pretrained_model(pretrained, overrides, load=resumed_dir is None)
    model = task.prepare_model(model, data)  # a fine-tuning task's head (a resumed run's weights load after)
    if pp > 1:
        from megacore.parallel.pipeline import cut_stage

        model = cut_stage(model, virtual_size=vp)  # this rank's layers (and input/output part on the ends)
    model = model.to(device)
    dtype = DTYPES[config.dtype]
    quiet_log(f"megacore train: {config.model}, steps {step + 1}-{config.train_steps} of {config.global_batch_size} x "
              f"{config.seq_len} tokens, {dtype_shown} on {device.type}, tensor-parallel {tp} x "
              + (f"pipeline-parallel {pp}" + (f" (interleaved, {vp} chunks per stage)" if vp > 1 else "") + " x "
                 if pp > 1 else "")
              + f"data-parallel {dp}" + (" (distributed optimizer)" if config.use_distributed_optimizer and dp > 1
                                         else "") + "; "
              f"output {out}")
    if dtype == torch.float16 and device.type == "cpu":
        quiet_log("megacore train: warning: float16 on a CPU is emulated (about 15x slower than float32 here); "
                  "use bfloat16 for half precision on CPUs")
    precision = MixedPrecision(model, dtype)
    distributed_optimizer = config.use_distributed_optimizer and dp > 1
    if config.use_distributed_optimizer and dp == 1:
        quiet_log("megacore train: --use-distributed-optimizer with data-parallel size 1 has nothing to shard; "
                  "training with the ordinary optimizer")
    ddp = (DistributedDataParallel(model, grad_dtype=torch.float32, reduce_scatter=distributed_optimizer)
           if dp > 1 else None)
    if distributed_optimizer:
        # ZeRO-1: this rank's 1/dp of the fp32 masters and moments. Under pipeline parallelism the stages run
        # their parts through the model's stage methods, which module forward pre-hooks do not see, so the
        # parameter all-gathers are waited for at the end of the step instead of in the next forward.
        optimizer = DistributedOptimizer(ddp, precision, lr=config.lr, weight_decay=config.weight_decay,
                                         overlap_param_gather=pp == 1, layer_lr_decay=config.layer_lr_decay)
        precision = optimizer
    else:
        optimizer = build_optimizer(precision, lr=config.lr, weight_decay=config.weight_decay,
                                    layer_lr_decay=config.layer_lr_decay)
    schedule = LRSchedule(optimizer, max_lr=config.lr, min_lr=config.min_lr,
                          warmup_steps=min(config.warmup_steps, config.train_steps), total_steps=config.train_steps,
                          decay=config.lr_decay_style)
    scaler = DynamicLossScaler() if dtype == torch.float16 else None
    trainer = Trainer(ddp or model, optimizer, schedule, precision=precision, scaler=scaler,
                      grad_accumulation=accumulation, clip=config.clip_grad, ddp=ddp, loss_fn=task.loss,
                      output_loss=task.output_loss,
                      max_skipped_steps=config.max_skipped_steps if scaler is not None else None,
                      loss_spike_factor=config.loss_spike_factor)

    if resumed_dir is not None:
        restore_training_state(resumed_dir, config, model, optimizer, schedule, scaler)
        trainer.step_count = step
    if main:
        with naming(out / "train_config.json"):
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    model_config = dataclasses.asdict(model.config)
    model_config["params_dtype"] = config.dtype
    model_class = model_class_name(model)
    train_config = dataclasses.asdict(config)
    train_config["override_lr_schedule"] = False  # an instruction for one resume, not part of the run

    def extra_state(step_: int) -> dict:
        e = {"schedule": schedule.state_dict(), "preset": config.model, "model_config": model_config,
             "tokenizer": TOKENIZER_DIR, "tokenizer_source": data.tokenizer_path, "consumed_samples": consumed,
             "step": step_, "data_segments": list(segments), "train_config": train_config}
        if model_class is not None:  # not the preset's class (a fine-tuning task's Classifier)
            e["model_class"] = model_class
        if scaler is not None:
            e["scaler"] = scaler.state_dict()
        return e

    def save(step_: int) -> str:
        with phase("megacore.checkpoint"), report_stalled_ranks(f"{_FN}: step {step_}: saving the checkpoint"):
            return save_checkpoint(ckpt_root, step_, model, optimizer, extra=extra_state(step_),
                                   keep_last=config.keep_last, files={TOKENIZER_DIR: data.tokenizer_path})

    sampler = PretrainingSampler(len(data.train), consumed, config.micro_batch_size, dp_rank, dp)
    loader = iter(torch.utils.data.DataLoader(data.train, batch_sampler=sampler, num_workers=config.num_workers))
    metrics = MetricsLog(out, step if resumed_dir else None, enabled=main)
    bar = progress_bar(config.train_steps, step, enabled=config.progress and main)
    history = []
    start, tokens_done = time.perf_counter(), 0
    result = {}

    def evaluate(at: int) -> dict:
        with phase("megacore.evaluate"), report_stalled_ranks(f"{_FN}: step {at}: evaluation"):
            evaluate_ = task.evaluate_pipeline if pp > 1 else task.evaluate
            record = {"step": at, **evaluate_(ddp or model, data.valid, config.micro_batch_size, config.eval_batches)}
        if not math.isfinite(record["valid_loss"]):
            raise TrainingDivergedError(at, f"step {at}: the validation loss is {record['valid_loss']}; the weights "
                                            "are not finite or overflow in evaluation. Nothing is saved")
        metrics.write(record)
        return record

    try:
        while step < config.train_steps:
            with phase("megacore.data"):
                micro = [to_device(task.batch(next(loader)), device) for _ in range(accumulation)]
            with report_stalled_ranks(f"{_FN}: step {step + 1}"):  # a stopped or hung rank: say which
                m = trainer.train_step(micro)
            step += 1
            consumed += config.global_batch_size
            tokens_done += m["tokens"]
            tps = tokens_done / (time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tps:,.0f}")
            if step % config.log_interval == 0 or step == config.train_steps:
                record = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                          "skipped": m["skipped"], "tokens_per_second": tps}
                history.append(record)
                metrics.write(record)
                if bar is None:  # no progress bar: the log says how the run goes
                    quiet_log(f"megacore train: step {step}: loss {m['loss']:.4f}, lr {m['lr']:.3g}, grad norm "
                              f"{m['grad_norm']:.3g}{' (skipped: fp16 overflow)' if m['skipped'] else ''}, "
                              f"{tps:,.0f} tokens/s")
            if step % config.eval_interval == 0 and step != config.train_steps:
                evaluate(step)
            if step % config.save_interval == 0 and step != config.train_steps:
                save(step)
        final = evaluate(step)
        path = save(step)
        result = dict(final, tokens_per_second=tokens_done / max(time.perf_counter() - start, 1e-9),
                      checkpoint=str(path))
        final_evaluation = task.final_evaluation(ddp or model, data, config)  # every rank (collectives)
        if final_evaluation:
            result.update(final_evaluation)
            metrics.write({"step": step, **final_evaluation})
        if main:
            final_metrics = task.final_metrics(data, config)  # GPT: the unigram baseline
            if final_metrics:
                result.update(final_metrics)
                metrics.write({"step": step, **final_metrics})
            plot_loss(out, history)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    if main:
        for line in task.report(result, ckpt_root):
            log(line)
    return result


# Re-exported: megacore.training.run is where these have always been imported from.
__all__ = ["MASKED_LM_UNITS", "TOKENIZER_DIR", "TrainConfig", "embedded_corpus", "embedded_corpus_wordpiece",
           "evaluate_checkpoint", "family_of_checkpoint", "load_config_file", "model_from_checkpoint", "parse_config",
           "train", "unigram_perplexity"]
