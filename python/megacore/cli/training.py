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
    "lr_decay_style": "learning-rate decay after warmup, to --min-lr: cosine, linear or constant",
    "layer_lr_decay": "layer-wise learning-rate decay (ELECTRA's fine-tuning recipe, e.g. 0.8): the head trains at "
                      "--lr, layer i of L at lr x d^(L+1-i), the embeddings at lr x d^(L+2); 1: off",
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
    "task": "a registered task to train the model with (megacore finetune TASK sets it); default: the model's "
            "pretraining task",
    "task_options": "JSON object of the task's own options (megacore finetune's task flags set them)",
    "pretrained": "a megacore train checkpoint to start from: its model, weights and tokenizer (megacore finetune "
                  "--checkpoint)",
    "hf_model": "a Hugging Face model directory (config.json, model.safetensors, tokenizer) to start from (megacore "
                "finetune --hf)",
    "override_lr_schedule": "on resume, apply --lr, --min-lr, --warmup-steps and --weight-decay from this command "
                            "instead of refusing a change",
}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: gpt-tiny on the embedded corpus, CPU, < 10 min)",
                       description="Train a model. With no arguments: gpt-tiny on the embedded Austen corpus. Under "
                                   "`torchrun --nproc-per-node N -m megacore train --tensor-parallel-size T "
                                   "--pipeline-parallel-size P` it trains with tensor size T, P pipeline stages and "
                                   "data-parallel size N/(T P) (gloo on CPU, NCCL on GPU). Rerunning "
                                   "with the same --output resumes from the newest complete checkpoint. "
                                   + _recipes())
    _add_config_flags(p)
    p.set_defaults(func=_cmd_train)


def _recipes() -> str:
    """The help's line on the pretraining tasks whose defaults differ from TrainConfig's (Task.defaults)."""
    from megacore.models.registry import PRESETS
    from megacore.training.tasks import Task

    tasks: dict = {}
    for name in PRESETS:
        task = Task.class_for_preset(name)
        if task is not None and task.defaults:
            tasks.setdefault(task, []).append(name)
    return " ".join(f"{', '.join(names)} default to their task's recipe: " +
                    ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in task.defaults.items()) + "."
                    for task, names in tasks.items()) + " The defaults below are the others'."


def _add_config_flags(p, skip: tuple = (), defaults: dict = {}) -> None:  # noqa: B006 - read only
    """--config and a flag per TrainConfig field (but ``skip``); ``defaults`` replace the fields' in the help."""
    from megacore.training.config import TrainConfig

    p.add_argument("--config", help="a JSON or YAML file of these options (command-line flags override it)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{_HELP[f.name]} (default: {default})")
        else:  # a string: TrainConfig converts and checks every value, from here and from --config alike
            p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                           help=f"{_HELP[f.name]} (default: {default})")


def _task_defaults(options: dict) -> dict:
    """The defaults (Task.defaults) of the run's task: ``task`` when given, else the pretraining task of the
    preset ``model``; {} for a name that is neither (the run reports it)."""
    from megacore.training.config import TrainConfig
    from megacore.training.tasks import TASKS, Task

    task, model = options.get("task"), options.get("model", TrainConfig.model)
    if task is not None:
        cls = TASKS.get(task) if isinstance(task, str) else None
    else:
        cls = Task.class_for_preset(model) if isinstance(model, str) else None
    return dict(cls.defaults) if cls is not None else {}


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
        # what this invocation asks for (a resume takes these, and only these; not the task's defaults)
        explicit = set(options) - ({"output"} if "output" not in given else set())
        options = {**_task_defaults(options), **options}
        config = parse_config(options)
        train(config, explicit=explicit)
    except (ValueError, OSError, NotImplementedError, ImportError, TrainingDivergedError,
            StalledRanksError) as e:
        return print_error(e)
    return 0


# megacore finetune TASK: the task's own flags, each a key of TrainConfig.task_options (type, help); bool: --x/--no-x
_TASK_FLAGS = {
    "translation": {"direction": (str, "es-en (default) or en-es")},
    "seq2seq": {"train": (str, "training pairs: a .jsonl/.json or .tsv file (optionally .xz)"),
                "valid": (str, "validation pairs (same format)"),
                "test": (str, "test pairs for the final metrics (default: --valid)"),
                "source_key": (str, "JSON field / TSV column of the source text (default: source)"),
                "target_key": (str, "JSON field / TSV column of the target text (default: target)")},
    "austen-novel": {}, "bible-pair": {}, "proper-nouns": {},
    "classify": {"train": (str, "training examples: a .jsonl/.json, .csv or .tsv file with a header (optionally .xz)"),
                 "valid": (str, "validation examples (same format)"),
                 "test": (str, "test examples for the final metrics (default: --valid)"),
                 "text_key": (str, "field / column of the text (default: text)"),
                 "pair_key": (str, "field / column of the optional second text (default: text_pair)"),
                 "label_key": (str, "field / column of the label (default: label)"),
                 "regression": (bool, "the labels are numbers to predict (MSE loss; Pearson, Spearman)")},
}
_SEQ2SEQ_FLAGS = {
    "target_length": (int, "target tokens per sample, </s> included (default 128)"),
    "beams": (int, "beams of the final beam-search evaluation (default 4; 1: greedy only)"),
    "length_penalty": (float, "beam search's length penalty: scores are log-probability / length ** this (default 1)"),
    "max_new_tokens": (int, "longest decoded output (default: --target-length)"),
    "source_prefix": (str, "text put before every source (translation: 'translate Spanish to English: ')"),
    "eval_samples": (int, "validation pairs decoded for BLEU at each evaluation (default 200; 0: all)"),
    "test_samples": (int, "test pairs decoded at the end (default 0: all)"),
}
_CLASSIFICATION_FLAGS = {
    "truncation": (bool, "cut texts longer than --seq-len (the longer of a pair first) instead of stopping at the "
                         "first one (default: on for the embedded tasks, off for classify)"),
    "classifier_dropout": (float, "dropout in the classification head (default: --hidden-dropout)"),
    "eval_samples": (int, "validation examples evaluated at each evaluation (default 0: all)"),
    "test_samples": (int, "test examples evaluated at the end (default 0: all)"),
}
_TASK_HELP = {
    "translation": "Spanish <-> English on the embedded Bible corpus (T5)",
    "seq2seq": "any text-to-text task on your files (T5)",
    "austen-novel": "which of Austen's six novels a passage comes from (6 classes; BERT, RoBERTa, ELECTRA, GPT)",
    "bible-pair": "is the English verse the translation of the Spanish one? (sentence pairs)",
    "proper-nouns": "tag each word of a passage as a name or not (token classification; encoders)",
    "classify": "classify (or score, --regression) the texts or text pairs of your JSONL / CSV / TSV files",
}


# TrainConfig fields megacore finetune sets itself or has no use for (the task brings its data and tokenizer)
_FINETUNE_SKIP = ("task", "task_options", "pretrained", "hf_model", "data", "valid_data", "tokenizer")


def _add_finetune(sub) -> None:
    from megacore.training.tasks import TASKS

    p = sub.add_parser("finetune", help="fine-tune a checkpoint, a Hugging Face model or a preset from scratch on a "
                                        "task: " + ", ".join(_TASK_FLAGS),
                       description="Fine-tune a `megacore train` checkpoint (--checkpoint), a Hugging Face model "
                                   "directory (--hf) or a preset from scratch (--model) on a task, with the progress "
                                   "bar, metrics, checkpoints and resume of `megacore train`. Classification tasks "
                                   "report accuracy, macro-F1 and (two classes) Matthews correlation on held-out "
                                   "data; translation and seq2seq BLEU, chrF (and ROUGE).")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, flags in _TASK_FLAGS.items():
        shared = _SEQ2SEQ_FLAGS if name in ("translation", "seq2seq") else _CLASSIFICATION_FLAGS
        t = tasks.add_parser(name, help=_TASK_HELP[name], description=_TASK_HELP[name])
        start = t.add_mutually_exclusive_group()
        start.add_argument("--checkpoint", dest="pretrained", metavar="DIR",
                           help="a megacore train checkpoint to start from (default: --model from scratch)")
        if shared is _CLASSIFICATION_FLAGS:
            start.add_argument("--hf", dest="hf_model", metavar="DIR",
                               help="a Hugging Face model directory to start from (config.json, model.safetensors, "
                                    "a tokenizer), e.g. one written by save_pretrained")
        for key, (kind, text) in {**flags, **shared}.items():
            flag = "--" + key.replace("_", "-")
            if kind is bool:
                t.add_argument(flag, dest="task_" + key, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            else:
                t.add_argument(flag, dest="task_" + key, type=kind, default=None, help=text, metavar=key.upper())
        _add_config_flags(t, skip=_FINETUNE_SKIP, defaults=TASKS[name].defaults)
        t.set_defaults(func=_cmd_finetune, task_flags=tuple({**flags, **shared}))


def _cmd_finetune(args: argparse.Namespace) -> int:
    from megacore.parallel import StalledRanksError
    from megacore.training.checkpoint import resolve_checkpoint
    from megacore.training.config import TrainConfig, load_config_file, parse_config
    from megacore.training.resume import _read_extra
    from megacore.training.run import train
    from megacore.training.tasks import TASKS
    from megacore.training.trainer import TrainingDivergedError

    try:
        options = dict(TASKS[args.task].defaults)
        options.update(load_config_file(args.config) if args.config else {})
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name not in _FINETUNE_SKIP and getattr(args, f.name) is not None}
        options.update(given)
        task_options = dict(options.get("task_options") or {})
        task_options.update({k: getattr(args, "task_" + k) for k in args.task_flags
                             if getattr(args, "task_" + k) is not None})
        options.update(task=args.task, task_options=task_options)
        start = {"pretrained"} if args.pretrained is not None else set()
        if args.pretrained is not None:
            options["pretrained"] = args.pretrained
        hf = getattr(args, "hf_model", None)
        if hf is not None:
            if "model" in given:
                raise ValueError("megacore finetune: --model with --hf: the Hugging Face directory is the model")
            options.update(hf_model=hf, model="hf")
            start = {"hf_model", "model"}
        if options.get("pretrained") and "model" not in given:  # the checkpoint's model
            options["model"] = _read_extra(resolve_checkpoint(options["pretrained"], "finetune"), "finetune")["preset"]
        if "output" not in options:
            options["output"] = f"runs/finetune-{args.task}"
        config = parse_config(options)
        train(config, explicit=set(given) | {"task", "task_options"} | start)
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
    p.add_argument("--task", default=None,
                   help="a fine-tuned checkpoint: evaluate it on this task (default: the task it was fine-tuned on): "
                        "accuracy, macro-F1, Matthews correlation (regression: MSE, Pearson, Spearman)")
    p.add_argument("--split", default="test", choices=["valid", "test"],
                   help="a fine-tuned checkpoint: which held-out split (default test)")
    p.add_argument("--file", default=None,
                   help="a fine-tuned checkpoint: evaluate on this JSONL / CSV / TSV file instead (with the run's "
                        "field names)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import math

    from megacore.training.classification import evaluate_finetuned, is_finetuned
    from megacore.training.run import evaluate_checkpoint

    try:
        if args.task is not None or args.file is not None or is_finetuned(args.checkpoint):
            result = evaluate_finetuned(args.checkpoint, task=args.task, split=args.split, file=args.file)
            print(json.dumps(result, indent=2))
            return 0
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
    p = sub.add_parser("generate", help="generate text from a checkpoint (KV cache, streamed); translate with a T5 one",
                       description="Continue a prompt with a `megacore train` checkpoint, printing tokens as they come; "
                                   "with an encoder-decoder (T5) checkpoint, the prompt is the source: it is encoded "
                                   "and its output decoded with the KV cache, greedily or by beam search (--beams), "
                                   "with the fine-tuning run's source prefix. Under `torchrun --nproc-per-node T` the "
                                   "model is split T-way (tensor parallelism).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints directory (the latest step) or a step directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beams", type=int, default=None,
                   help="encoder-decoder checkpoints (T5): beam search with this many beams (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="encoder-decoder beam search: scores are log-probability / length ** this (default 1)")
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
        model, tokenizer, extra = model_from_checkpoint(args.checkpoint)
        if hasattr(model, "encode"):  # an encoder-decoder: the prompt is the source
            print(_translate(model, tokenizer, extra, args))
            return 0
        if args.beams is not None:
            raise ValueError("megacore generate: --beams is for encoder-decoder (T5) checkpoints; a decoder samples "
                             "or decodes greedily (--greedy)")
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


def _translate(model, tokenizer, extra: dict, args: argparse.Namespace) -> str:
    """The output of an encoder-decoder checkpoint for ``--prompt``: after the fine-tuning run's source prefix (none
    for a pretrained checkpoint), greedy or beam search, at most ``--max-new-tokens``."""
    from megacore.training.seq2seq import translate
    from megacore.training.tasks import TASKS

    saved = extra.get("train_config") or {}
    prefix = ""
    if saved.get("task") in TASKS and hasattr(TASKS[saved["task"]], "source_prefix_of"):
        prefix = TASKS[saved["task"]].source_prefix_of(saved.get("task_options") or {})
    if not args.prompt.strip():
        raise ValueError("megacore generate: --prompt is empty")
    beams = 1 if args.beams is None else args.beams
    return translate(model, tokenizer, [prefix + args.prompt], max_new_tokens=args.max_new_tokens, num_beams=beams,
                     length_penalty=args.length_penalty, source_length=saved.get("seq_len"))[0]


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify a text (or text pair, or tag its words) with a fine-tuned checkpoint",
                       description="Run a fine-tuned classifier on --text (and --text-pair): prints the predicted "
                                   "label and its probability (a regression checkpoint: the number; a tagging one: "
                                   "each word with its tag). Under `torchrun --nproc-per-node T` the model is split "
                                   "T-way (tensor parallelism).")
    p.add_argument("--checkpoint", required=True, help="a checkpoints directory (the latest step) or a step directory")
    p.add_argument("--text", required=True, help="the text to classify")
    p.add_argument("--text-pair", default=None, help="the second text of a sentence-pair task")
    p.add_argument("--top", type=int, default=1, help="print the TOP most probable labels (default 1)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from megacore.training.classification import predict_text
    from megacore.training.run import model_from_checkpoint

    try:
        printing = _init_tensor_parallel_from_torchrun()
        if not printing:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this command
        model, tokenizer, extra = model_from_checkpoint(args.checkpoint)
        for line in predict_text(model, tokenizer, extra, args.text, args.text_pair, top=args.top):
            print(line)
    except (ValueError, OSError, TypeError) as e:
        return print_error(e)
    return 0


def add_commands(sub) -> None:
    _add_train(sub)
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_generate(sub)
    _add_predict(sub)
