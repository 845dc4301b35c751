"""`megacore train`, `megacore evaluate`, `megacore generate`: thin argument parsing over megacore.training."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import get_type_hints

from megacore.cli.errors import print_error

_HELP = {
    "model": "preset to train (megacore.models.registry.PRESETS)",
    "data": "prefix of a prepared dataset (megacore prepare); default: the embedded Austen corpus",
    "valid_data": "prefix of the validation dataset; default: the corpus's held-out novel, or 1%% of --data",
    "tokenizer": "tokenizer directory; default: PREFIX.tokenizer next to --data",
    "vocab_size": "vocabulary of the BPE trained for the embedded corpus",
    "cache_dir": "where the embedded corpus and dataset indices are prepared (once)",
    "output": "run directory: metrics.jsonl, loss.png, checkpoints/",
    "seq_len": "tokens per sample",
    "micro_batch_size": "samples per forward/backward on each data-parallel rank",
    "global_batch_size": "samples per optimizer step (gradient accumulation makes up the rest)",
    "train_steps": "optimizer steps",
    "lr": "peak learning rate", "min_lr": "final learning rate (cosine decay)", "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay (not on biases, norms, embeddings)", "clip_grad": "global gradient-norm clip",
    "dtype": "parameter dtype: auto (bfloat16 where the CPU or GPU computes it natively: AVX512-BF16, AMX, "
             "Ampere or newer; float32 elsewhere; the run's header line says which and why, `megacore info` "
             "shows it), float32, bfloat16 (fp32 master weights) or float16 (+ dynamic loss scaling)",
    "recompute": "activation checkpointing: none, selective (core attention) or full (every layer)",
    "hidden_dropout": "dropout on residual branches", "attention_dropout": "dropout on attention probabilities",
    "tensor_parallel_size": "tensor-parallel size (under torchrun; data-parallel = processes / (this x pipeline size))",
    "pipeline_parallel_size": "pipeline stages (under torchrun): the layers split into this many stages, 1F1B schedule",
    "virtual_pipeline_parallel_size": "layer chunks per pipeline stage: > 1 runs the interleaved 1F1B schedule "
                                      "(smaller bubble, more communication)",
    "use_distributed_optimizer": "shard fp32 master weights and AdamW moments over the data-parallel ranks "
                                 "(ZeRO-1, as Megatron's --use-distributed-optimizer)",
    "sequence_parallel": "sequence parallelism inside tensor-parallel groups",
    "distributed_timeout_minutes": "under torchrun: minutes a collective waits for the other ranks before the run "
                                   "stops, naming the ranks that did not arrive (default: 10 on NCCL, 5 on gloo)",
    "seed": "seed of initialization, data order and dropout", "log_interval": "steps between metric lines",
    "eval_interval": "steps between validations", "eval_batches": "validation batches",
    "save_interval": "steps between checkpoints", "keep_last": "checkpoints kept",
    "num_workers": "DataLoader worker processes", "progress": "show the progress bar",
    "model_overrides": "JSON object of ModelConfig fields to override, e.g. '{\"num_layers\": 2}'",
    "loss_spike_factor": "stop when a step's loss exceeds this factor x the largest of the previous 100 steps "
                         "(off by default; Megatron uses 10)",
    "max_skipped_steps": "float16: stop after this many consecutive steps skipped for overflow",
    "override_lr_schedule": "on resume, apply --lr, --min-lr, --warmup-steps and --weight-decay from this command "
                            "instead of refusing a change",
}


def _add_train(sub) -> None:
    from megacore.training.config import TrainConfig

    p = sub.add_parser("train", help="train a model (default: gpt-tiny on the embedded corpus, CPU, < 10 min)",
                       description="Train a model. With no arguments: gpt-tiny on the embedded Austen corpus. Under "
                                   "`torchrun --nproc-per-node N -m megacore train --tensor-parallel-size T "
                                   "--pipeline-parallel-size P` it trains with tensor size T, P pipeline stages and "
                                   "data-parallel size N/(T P) (gloo on CPU, NCCL on GPU). Rerunning "
                                   "with the same --output resumes from the newest complete checkpoint.")
    p.add_argument("--config", help="a JSON or YAML file of these options (command-line flags override it)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{_HELP[f.name]} (default: {default})")
        else:  # a string: TrainConfig converts and checks every value, from here and from --config alike
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                           help=f"{_HELP[f.name]} (default: {default})")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from megacore.parallel import StalledRanksError
    from megacore.training.config import TrainConfig, load_config_file, parse_config
    from megacore.training.run import train
    from megacore.training.trainer import TrainingDivergedError

    try:
        options = load_config_file(args.config) if args.config else {}
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
        options.update(given)
        if "output" not in options:
            options["output"] = f"runs/{options.get('model', TrainConfig.model)}"
        config = parse_config(options)
        train(config, explicit=set(options) - ({"output"} if "output" not in given else set()))
    except (ValueError, OSError, NotImplementedError, ImportError, TrainingDivergedError,
            StalledRanksError) as e:
        return print_error(e)
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity and LAMBADA-style last-word accuracy of a checkpoint",
                       description="Evaluate a `megacore train` checkpoint on the held-out novel (Persuasion): "
                                   "perplexity, and the accuracy of greedily predicting each passage's last word.")
    p.add_argument("--checkpoint", required=True, help="a checkpoints directory (the latest step) or a step directory")
    p.add_argument("--passages", type=int, default=200, help="last-word passages (default 200)")
    p.add_argument("--context-tokens", type=int, default=128, help="context tokens before the last word (default 128)")
    p.add_argument("--batches", type=int, default=50, help="perplexity batches of 8 x seq_len (default 50)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from megacore.training.run import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(args.checkpoint, batches=args.batches, passages=args.passages,
                                     context_tokens=args.context_tokens)
        if not math.isfinite(result["valid_loss"]):
            raise ValueError(f"megacore evaluate: the validation loss of {result['checkpoint']} is "
                             f"{result['valid_loss']}: its weights are not finite, or overflow")
    except (ValueError, OSError, TypeError) as e:
        return print_error(e)
    print(json.dumps(result, indent=2))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache, streamed)",
                       description="Continue a prompt with a `megacore train` checkpoint, printing tokens as they come. "
                                   "Under `torchrun --nproc-per-node T` the model is split T-way (tensor parallelism).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints directory (the latest step) or a step directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)


def _init_tensor_parallel_from_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1): torch.distributed and tensor parallelism over all the processes
    (megacore.parallel.launch); returns whether this process should print."""
    import torch.distributed as dist

    from megacore.parallel.launch import init_from_torchrun

    return init_from_torchrun(None, who="megacore generate") is None or dist.get_rank() == 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from megacore.training import generate
    from megacore.training.run import model_from_checkpoint

    try:
        printing = _init_tensor_parallel_from_torchrun()
        if not printing:  # every rank computes (tensor parallelism), rank 0 prints
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this command
        model, tokenizer, _ = model_from_checkpoint(args.checkpoint)
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            raise ValueError("megacore generate: --prompt encodes to no tokens")
        produced: list[int] = []
        printed, started = 0, False

        def stream(token) -> None:  # decode the whole continuation each time: BPE pieces may join
            nonlocal printed, started
            if not started:  # the prompt goes out with the first token: every argument is checked by then
                sys.stdout.write(args.prompt)
                printed, started = len(tokenizer.decode(prompt)), True
            produced.append(int(token))
            text = tokenizer.decode(prompt + produced)
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

        generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, greedy=args.greedy, eos_id=tokenizer.eod, seed=args.seed, stream=stream)
        sys.stdout.write(("" if started else args.prompt) + "\n")
    except (ValueError, OSError, TypeError) as e:
        return print_error(e)
    return 0


def add_commands(sub) -> None:
    _add_train(sub)
    _add_evaluate(sub)
    _add_generate(sub)
