"""``megacore train``: one command from text to a trained, checkpointed model.

    megacore train                                   # gpt-tiny on the embedded Austen corpus, CPU, < 10 min
    megacore train --model gpt2-small --data PREFIX --tensor-parallel-size 2 ...   (under torchrun)

With no ``--data`` the embedded corpus is prepared once into ``--cache-dir`` (a byte-level BPE trained on
the five training novels; *Persuasion* held out for validation). The run directory (``--output``) gets
``train_config.json``, ``metrics.jsonl`` (one JSON object per logged step and per evaluation),
``loss.png`` when matplotlib is installed, TensorBoard events when tensorboard is, and ``checkpoints/``.
A checkpoint's ``extra`` holds what :func:`model_from_checkpoint` needs to rebuild the model and find the
tokenizer, so ``megacore generate`` / ``megacore evaluate`` take just the checkpoint directory.

``--model gpt-*`` trains a causal LM (validation perplexity, against a unigram baseline);
``--model bert-*`` / ``roberta-*`` masked-LM pretraining (with NSP for BERT's presets; reports MLM
accuracy); ``--model electra-*`` ELECTRA pretraining (reports the discriminator's accuracy). The
masked-LM runs tokenize the embedded corpus with a WordPiece tokenizer, one sentence per sequence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megacore._files import atomic_write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FN = "megacore train"


@dataclass
class TrainConfig:
    """Every option of ``megacore train`` (the command line's flags are these fields; a JSON or YAML
    ``--config`` file may hold any of them)."""

    model: str = "gpt-tiny"
    data: Optional[str] = None  # prefix of a prepared dataset; None: the embedded corpus
    valid_data: Optional[str] = None  # None: the embedded corpus's validation split (or 1% of --data)
    tokenizer: Optional[str] = None  # None: the one saved next to --data
    vocab_size: int = 8192  # of the tokenizer trained for the embedded corpus
    cache_dir: str = str(Path.home() / ".cache" / "megacore")
    output: str = "runs/gpt-tiny"
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8
    train_steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    dtype: str = "float32"
    recompute: str = "none"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_timeout_minutes: Optional[float] = None  # None: 10 on NCCL, 5 on gloo (parallel.timeouts)
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 20
    save_interval: int = 500
    keep_last: int = 2
    num_workers: int = 0
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "train_steps", "log_interval",
                     "eval_interval", "eval_batches", "save_interval", "keep_last", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{_FN}: --{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"{_FN}: --dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"{_FN}: need 0 < --min-lr ({self.min_lr}) <= --lr ({self.lr})")


def load_config_file(path: str) -> dict:
    """The options in a JSON or YAML file (YAML needs PyYAML)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_FN}: config file {path} does not exist")
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"{_FN}: {path} is YAML; install PyYAML or use JSON") from e
        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_FN}: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{_FN}: {path} must hold a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{_FN}: {path} has unknown options {unknown}; known: {sorted(known)}")
    return data


# ---- distributed set-up ---------------------------------------------------------------------------------


def _init_distributed(config: TrainConfig):
    """Initializes torch.distributed under torchrun (gloo on CPU, NCCL on CUDA) and megacore's model
    parallelism; returns the ParallelState, or None for a single process with tensor_parallel_size 1."""
    from megacore import parallel

    minutes = config.distributed_timeout_minutes
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0):
        raise ValueError(f"{_FN}: --distributed-timeout-minutes={minutes!r} must be a number > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and config.tensor_parallel_size == 1:
        return None
    if world == 1:
        raise ValueError(f"{_FN}: --tensor-parallel-size {config.tensor_parallel_size} needs that many processes: "
                         f"torchrun --nproc-per-node {config.tensor_parallel_size} -m megacore train ...")
    if world % config.tensor_parallel_size:
        raise ValueError(f"{_FN}: --tensor-parallel-size {config.tensor_parallel_size} does not divide the "
                         f"{world} processes (torchrun --nproc-per-node); data-parallel size = processes / "
                         "tensor-parallel size must be a whole number")
    parallel.init_distributed(config.distributed_timeout_minutes)
    if parallel.model_parallel_is_initialized():
        parallel.destroy_model_parallel()
    return parallel.initialize_model_parallel(config.tensor_parallel_size)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ---- data ---------------------------------------------------------------------------------------------------


def embedded_corpus(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """(train prefix, valid prefix, tokenizer dir) of the embedded corpus, prepared once into ``cache_dir``
    (rank 0 prepares, the others wait)."""
    from megacore.data.prepare import prepare_dataset
    from megacore.parallel.timeouts import barrier

    root = Path(cache_dir) / f"austen-bpe{vocab_size}"
    train, valid = root / "train", root / "valid"
    tokenizer = Path(str(train) + ".tokenizer")
    done = all(Path(str(p) + suffix).exists() for p in (train, valid) for suffix in (".bin", ".idx"))
    if not done and _is_main():
        log(f"megacore train: preparing the embedded corpus into {root} (once)")
        prepare_dataset(None, train, train_tokenizer="bpe", vocab_size=vocab_size, split="train", progress=False,
                        log=lambda m: None)
        prepare_dataset(None, valid, tokenizer=tokenizer, split="valid", progress=False, log=lambda m: None)
    barrier(f"{_FN}: preparing the embedded corpus into {root}")  # not bound by the collective timeout
    return str(train), str(valid), str(tokenizer)


def _datasets(config: TrainConfig, dp_size: int, log):
    from megacore.data import GPTDataset, IndexedDataset, Tokenizer

    if config.data is None:
        train_prefix, valid_prefix, tok_path = embedded_corpus(config.cache_dir, config.vocab_size, log)
    else:
        train_prefix, valid_prefix = config.data, config.valid_data
        tok_path = config.tokenizer or config.data + ".tokenizer"
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{_FN}: tokenizer {tok_path} does not exist (pass --tokenizer)")
    tokenizer = Tokenizer.load(tok_path)
    train_ds = IndexedDataset(train_prefix)
    samples = config.train_steps * config.global_batch_size
    if valid_prefix is None:  # hold out the last 1% of the documents
        n = train_ds.num_documents
        cut = max(1, n - max(1, n // 100))
        train_docs, valid_docs, valid_ds = range(cut), range(cut, n), train_ds
    else:
        valid_ds = IndexedDataset(valid_prefix)
        train_docs, valid_docs = range(train_ds.num_documents), range(valid_ds.num_documents)
    cache = str(Path(config.cache_dir) / "index")
    train = GPTDataset(train_ds, train_docs, config.seq_len, samples, config.seed, cache_dir=cache, labels=True)
    valid = GPTDataset(valid_ds, valid_docs, config.seq_len, config.eval_batches * config.micro_batch_size * dp_size,
                       config.seed + 1, cache_dir=cache, labels=True)
    return train, valid, tokenizer, os.path.abspath(tok_path), train_ds


def _batch(item_batch: dict) -> dict:
    return {"input_ids": item_batch["tokens"].long(), "labels": item_batch["labels"].long()}


def unigram_perplexity(dataset, tokenizer_vocab: int, train_counts) -> float:
    """Perplexity of the unigram model (token frequencies of the training data, add-one smoothed) on the
    labels of ``dataset``: the baseline the trained model must beat."""
    import numpy as np

    probs = (train_counts + 1.0) / (train_counts.sum() + tokenizer_vocab)
    logp, n = 0.0, 0
    for i in range(len(dataset)):
        labels = np.asarray(dataset[i]["labels"])
        logp += float(np.log(probs[labels]).sum())
        n += labels.size
    return math.exp(-logp / max(n, 1))


def _family(model: str) -> str:
    """"gpt", "bert" or "electra": which kind of pretraining a preset gets."""
    from megacore.models import GPTModel
    from megacore.models.bert import BertModel
    from megacore.models.electra import ElectraModel
    from megacore.models.registry import PRESETS

    cls = PRESETS[model][0]
    cls = getattr(cls, "func", cls)  # functools.partial presets
    return {GPTModel: "gpt", BertModel: "bert", ElectraModel: "electra"}[cls]


def embedded_corpus_wordpiece(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """The embedded corpus for masked-LM pretraining: a WordPiece tokenizer, one document per paragraph and
    one sentence per sequence (sentence pairs come from within a document, the random ones from another),
    prepared once into ``cache_dir``."""
    from megacore.data.prepare import prepare_dataset
    from megacore.parallel.timeouts import barrier

    root = Path(cache_dir) / f"austen-wordpiece{vocab_size}-paragraph-sentences"
    train, valid = root / "train", root / "valid"
    tokenizer = Path(str(train) + ".tokenizer")
    done = all(Path(str(p) + suffix).exists() for p in (train, valid) for suffix in (".bin", ".idx"))
    if not done and _is_main():
        log(f"megacore train: preparing the embedded corpus (WordPiece, sentences) into {root} (once)")
        prepare_dataset(None, train, train_tokenizer="wordpiece", vocab_size=vocab_size, split="train",
                        document_unit="paragraph", split_sentences=True, progress=False, log=lambda m: None)
        prepare_dataset(None, valid, tokenizer=tokenizer, split="valid", document_unit="paragraph",
                        split_sentences=True, progress=False, log=lambda m: None)
    barrier(f"{_FN}: preparing the embedded corpus into {root}")  # not bound by the collective timeout
    return str(train), str(valid), str(tokenizer)


def _masked_datasets(config: TrainConfig, family: str, binary_head: bool, dp_size: int, log):
    from megacore.data import ElectraDataset, IndexedDataset, MaskedLMDataset, Tokenizer

    if config.data is None:
        train_prefix, valid_prefix, tok_path = embedded_corpus_wordpiece(config.cache_dir, config.vocab_size, log)
    else:
        if config.valid_data is None:
            raise ValueError(f"{_FN}: masked-LM pretraining on --data needs --valid-data too")
        train_prefix, valid_prefix = config.data, config.valid_data
        tok_path = config.tokenizer or config.data + ".tokenizer"
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{_FN}: tokenizer {tok_path} does not exist (pass --tokenizer)")
    tokenizer = Tokenizer.load(tok_path)
    cls = ElectraDataset if family == "electra" else MaskedLMDataset
    mode = {} if family == "electra" else {"mode": "nsp" if binary_head else "packed"}
    train = cls(IndexedDataset(train_prefix), tokenizer, config.seq_len, seed=config.seed,
                num_samples=config.train_steps * config.global_batch_size, **mode)
    valid = cls(IndexedDataset(valid_prefix), tokenizer, config.seq_len, seed=config.seed + 1,
                num_samples=config.eval_batches * config.micro_batch_size * dp_size, **mode)
    return train, valid, tokenizer, os.path.abspath(tok_path)


def _masked_batch(item_batch: dict) -> dict:
    """A collated masked-LM / ELECTRA batch as the model's keyword arguments (original_ids is only for
    inspection: the ELECTRA model recovers the originals from mlm_labels)."""
    return {k: v.long() for k, v in item_batch.items() if k != "original_ids"}


def _masked_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def _masked_eval(model, dataset, family: str, micro_batch_size: int, batches: int) -> dict:
    """Mean validation loss, and the MLM accuracy (BERT: argmax at the masked positions) or the
    discriminator's accuracy (ELECTRA: "replaced or not" over the real tokens)."""
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size)
    loss_sum, correct, total, n = 0.0, 0, 0, 0
    try:
        for i, item in enumerate(loader):
            if i >= batches:
                break
            batch = _masked_batch(item)
            out = model(**batch)
            loss_sum += float(out.loss)
            n += 1
            if family == "electra":
                real = batch["attention_mask"].bool()
                guess = out.discriminator_logits.float() > 0
                correct += int(((guess == out.discriminator_labels) & real).sum())
                total += int(real.sum())
            else:
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).mlm
                masked = batch["labels"] != -100
                correct += int(((logits.argmax(-1) == batch["labels"]) & masked).sum())
                total += int(masked.sum())
    finally:
        model.train(was_training)
    name = "discriminator_accuracy" if family == "electra" else "mlm_accuracy"
    return {"valid_loss": loss_sum / max(n, 1), name: correct / max(total, 1)}


# ---- the run ----------------------------------------------------------------------------------------------------


def model_from_checkpoint(checkpoint: str, device=None):
    """(model in eval mode with the checkpoint's weights, tokenizer, the checkpoint's extra) for a checkpoint
    written by ``megacore train`` (a step directory or the checkpoints root: the latest step)."""
    from megacore.data import Tokenizer
    from megacore.models import ModelConfig
    from megacore.models.registry import PRESETS
    from megacore.training.checkpoint import load_checkpoint, resolve_checkpoint

    step_dir = resolve_checkpoint(checkpoint, "model_from_checkpoint")
    extra = torch.load(os.path.join(step_dir, "extra.pt"), weights_only=True) if os.path.exists(
        os.path.join(step_dir, "extra.pt")) else {}
    if "model_config" not in extra:
        raise ValueError(f"megacore: {step_dir} was not written by `megacore train` (no model_config in its extra)")
    fields = dict(extra["model_config"])
    fields["params_dtype"] = DTYPES[fields["params_dtype"]]
    from megacore.parallel import state

    fields["tensor_parallel"] = state.model_parallel_is_initialized() and state.get_tensor_parallel_world_size() > 1
    fields["sequence_parallel"] = False
    model_cls = PRESETS[extra["preset"]][0]
    model = model_cls(ModelConfig(**fields), device=device)
    load_checkpoint(step_dir, model, restore_rng=False)
    return model.eval(), Tokenizer.load(extra["tokenizer"]), extra


def train(config: TrainConfig, log=print) -> dict:
    """Runs ``megacore train``; returns the final metrics (validation loss/perplexity, the unigram baseline,
    tokens/s, the checkpoint path)."""
    from megacore.data import PretrainingSampler
    from megacore.models.registry import PRESETS, build, preset_config
    from megacore.parallel import DistributedDataParallel, report_stalled_ranks
    from megacore.training import LRSchedule, MixedPrecision, Trainer, build_optimizer, perplexity
    from megacore.training.checkpoint import load_checkpoint, save_checkpoint
    from megacore.training.precision import DynamicLossScaler

    config.validate()
    if config.model not in PRESETS:
        raise ValueError(f"{_FN}: unknown --model {config.model!r}; known: {', '.join(sorted(PRESETS))}")
    family = _family(config.model)
    state = _init_distributed(config)
    tp, dp = (state.tensor_parallel_size, state.data_parallel_size) if state else (1, 1)
    dp_rank = state.data_parallel_rank if state else 0
    per_step = config.micro_batch_size * dp
    if config.global_batch_size % per_step:
        raise ValueError(f"{_FN}: --global-batch-size {config.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {config.micro_batch_size} x data-parallel size {dp}")
    accumulation = config.global_batch_size // per_step
    torch.manual_seed(config.seed)
    out = Path(config.output)
    main = _is_main()
    quiet_log = log if main else (lambda m: None)

    if family == "gpt":
        train_ds, valid_ds, tokenizer, tok_path, train_indexed = _datasets(config, dp, quiet_log)
        to_batch, loss_fn = _batch, None
    else:
        binary_head = _family(config.model) == "bert" and getattr(PRESETS[config.model][0], "keywords", {}).get(
            "head", "nsp") is not None
        train_ds, valid_ds, tokenizer, tok_path = _masked_datasets(config, family, binary_head, dp, quiet_log)
        to_batch, loss_fn, train_indexed = _masked_batch, _masked_loss, None
    overrides = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=max(config.seq_len,
                     preset_config(config.model).max_position_embeddings), hidden_dropout=config.hidden_dropout,
                     attention_dropout=config.attention_dropout, recompute=config.recompute,
                     tensor_parallel=state is not None, sequence_parallel=config.sequence_parallel,
                     **config.model_overrides)
    model = build(config.model, **overrides)
    dtype = DTYPES[config.dtype]
    precision = MixedPrecision(model, dtype)
    ddp = DistributedDataParallel(model, grad_dtype=torch.float32) if dp > 1 else None
    optimizer = build_optimizer(precision, lr=config.lr, weight_decay=config.weight_decay)
    schedule = LRSchedule(optimizer, max_lr=config.lr, min_lr=config.min_lr,
                          warmup_steps=min(config.warmup_steps, config.train_steps),
                          total_steps=config.train_steps)
    scaler = DynamicLossScaler() if dtype == torch.float16 else None
    trainer = Trainer(ddp or model, optimizer, schedule, precision=precision, scaler=scaler,
                      grad_accumulation=accumulation, clip=config.clip_grad, ddp=ddp, loss_fn=loss_fn)

    ckpt_root = out / "checkpoints"
    step = 0
    if (ckpt_root / "latest").exists():
        extra = load_checkpoint(ckpt_root, model, optimizer)
        schedule.load_state_dict(extra["schedule"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        step = int(extra["step"])
        quiet_log(f"megacore train: resuming from {ckpt_root} at step {step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    model_config = dataclasses.asdict(model.config)
    model_config["params_dtype"] = config.dtype

    def extra_state(step_: int) -> dict:
        e = {"schedule": schedule.state_dict(), "preset": config.model, "model_config": model_config,
             "tokenizer": tok_path, "consumed_samples": step_ * config.global_batch_size, "step": step_}
        if scaler is not None:
            e["scaler"] = scaler.state_dict()
        return e

    sampler = PretrainingSampler(len(train_ds), step * config.global_batch_size, config.micro_batch_size,
                                 dp_rank, dp)
    loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=config.num_workers))
    metrics_file = open(out / "metrics.jsonl", "a") if main else None  # noqa: SIM115 - closed below
    tb = _tensorboard(out) if main else None
    bar = _progress(config, step, main)
    history = []
    start, tokens_done = time.perf_counter(), 0
    result = {}

    def evaluate(at: int) -> dict:
        with report_stalled_ranks(f"{_FN}: step {at}: evaluation"):
            if family == "gpt":
                r = perplexity(ddp or model, valid_ds, config.micro_batch_size, config.eval_batches)
                record = {"step": at, "valid_loss": r["loss"], "valid_perplexity": r["perplexity"]}
            else:
                record = {"step": at, **_masked_eval(ddp or model, valid_ds, family, config.micro_batch_size,
                                                      config.eval_batches)}
        _write(metrics_file, tb, record)
        return record

    def save(at: int) -> str:
        with report_stalled_ranks(f"{_FN}: step {at}: saving the checkpoint"):
            return save_checkpoint(ckpt_root, at, model, optimizer, extra=extra_state(at), keep_last=config.keep_last)

    try:
        while step < config.train_steps:
            micro = [to_batch(next(loader)) for _ in range(accumulation)]
            with report_stalled_ranks(f"{_FN}: step {step + 1}"):  # a stopped or hung rank: say which
                m = trainer.train_step(micro)
            step += 1
            tokens_done += m["tokens"]
            tps = tokens_done / (time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tps:,.0f}")
            if step % config.log_interval == 0 or step == config.train_steps:
                record = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                          "skipped": m["skipped"], "tokens_per_second": tps}
                history.append(record)
                _write(metrics_file, tb, record)
            if step % config.eval_interval == 0 and step != config.train_steps:
                evaluate(step)
            if step % config.save_interval == 0 and step != config.train_steps:
                save(step)
        final = evaluate(step)
        path = save(step)
        result = dict(final, tokens_per_second=tokens_done / max(time.perf_counter() - start, 1e-9),
                      checkpoint=str(path))
        if main and family == "gpt":
            counts = _token_counts(train_indexed, tokenizer.vocab_size)
            result["unigram_perplexity"] = unigram_perplexity(_Labels(valid_ds, config.eval_batches *
                                                                      config.micro_batch_size), tokenizer.vocab_size,
                                                              counts)
            _write(metrics_file, tb, {"step": step, "unigram_perplexity": result["unigram_perplexity"]})
        if main:
            _plot(out, history)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if tb is not None:
            tb.close()
    if main and family == "gpt":
        log(f"megacore train: step {step}: validation loss {result['valid_loss']:.3f}, perplexity "
            f"{result['valid_perplexity']:.1f} (a unigram model: {result['unigram_perplexity']:.1f}); "
            f"{result['tokens_per_second']:,.0f} tokens/s")
    elif main:
        metric = "discriminator_accuracy" if family == "electra" else "mlm_accuracy"
        log(f"megacore train: step {step}: validation loss {result['valid_loss']:.3f}, "
            f"{metric.replace('_', ' ')} {result[metric]:.3f}; {result['tokens_per_second']:,.0f} tokens/s")
    if main and family == "gpt":
        log(f"megacore train: checkpoint {result['checkpoint']}\n"
            f"  generate from it:  megacore generate --checkpoint {ckpt_root} --prompt \"It is a truth\"\n"
            f"  evaluate it:       megacore evaluate --checkpoint {ckpt_root}")
    elif main:
        log(f"megacore train: checkpoint {result['checkpoint']} (load it with "
            "megacore.training.run.model_from_checkpoint, or carry it to transformers with megacore.interop.hf.to_hf)")
    return result


def _token_counts(indexed, vocab_size: int, max_tokens: int = 50_000_000):
    """Token frequencies of (at most the first ``max_tokens`` tokens of) a prepared dataset."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    for i in range(len(indexed)):
        seq = np.asarray(indexed[i])
        counts += np.bincount(seq, minlength=vocab_size)[:vocab_size]
        seen += seq.size
        if seen >= max_tokens:
            break
    return counts


class _Labels:
    """The first ``n`` items of a dataset, for the unigram baseline over the same tokens as evaluation."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def _write(f, tb, record: dict) -> None:
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()
    if tb is not None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _progress(config: TrainConfig, step: int, main: bool):
    if not (config.progress and main):
        return None
    from tqdm import tqdm

    return tqdm(total=config.train_steps, initial=step, desc="megacore train", unit="step", dynamic_ncols=True)


def _plot(out: Path, history: list) -> None:
    """loss.png, when matplotlib (an optional extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("megacore train")
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")


__all__ = ["TrainConfig", "embedded_corpus", "load_config_file", "model_from_checkpoint", "train",
           "unigram_perplexity"]
