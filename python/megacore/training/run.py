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

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megacore._files import atomic_write_text
from megacore._profiling import phase
from megacore.training.trainer import TrainingDivergedError

from megacore.training.config import TrainConfig, load_config_file, parse_config, resume_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FN = "megacore train"


# ---- distributed set-up ---------------------------------------------------------------------------------


def _init_distributed(config: TrainConfig):
    """torch.distributed and megacore's grid under torchrun (megacore.parallel.launch); the ParallelState, or
    None for a single process with tensor_parallel_size 1."""
    from megacore.parallel.launch import init_from_torchrun

    return init_from_torchrun(config.tensor_parallel_size, 1, config.distributed_timeout_minutes, _FN)


def _train_device() -> torch.device:
    """Where ``megacore train`` trains: this process's GPU when CUDA is available (torchrun's LOCAL_RANK),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _is_main() -> bool:
    """Global rank 0 (before torch.distributed is initialized: torchrun's RANK, so that a run's start-up
    logs and writes once too)."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


# ---- data ---------------------------------------------------------------------------------------------------


# How masked-LM pretraining cuts the embedded corpus: one document per paragraph, one sentence per sequence
# (sentence pairs come from within a document, the random ones from another).
MASKED_LM_UNITS = {"document_unit": "paragraph", "split_sentences": True}


def _prepare_embedded_once(root: Path, what: str, train_tokenizer: str, vocab_size: int, log,
                           **units) -> tuple[str, str, str]:
    """(train prefix, valid prefix, tokenizer dir) of the embedded corpus under ``root``, prepared there once
    with a ``train_tokenizer`` tokenizer trained on the training novels (rank 0 prepares; the others wait in
    a barrier that the collective timeout does not bound)."""
    from megacore.data.prepare import prepare_dataset
    from megacore.parallel.timeouts import barrier

    train, valid = root / "train", root / "valid"
    tokenizer = Path(str(train) + ".tokenizer")
    done = all(Path(str(p) + suffix).exists() for p in (train, valid) for suffix in (".bin", ".idx"))
    if not done and _is_main():
        log(f"megacore train: preparing the embedded corpus{what} into {root} (once)")
        prepare_dataset(None, train, train_tokenizer=train_tokenizer, vocab_size=vocab_size, split="train",
                        progress=False, log=lambda m: None, **units)
        prepare_dataset(None, valid, tokenizer=tokenizer, split="valid", progress=False, log=lambda m: None, **units)
    barrier(f"{_FN}: preparing the embedded corpus into {root}")
    return str(train), str(valid), str(tokenizer)


def embedded_corpus(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """(train prefix, valid prefix, tokenizer dir) of the embedded corpus with a byte-level BPE, prepared once
    into ``cache_dir`` (rank 0 prepares, the others wait)."""
    return _prepare_embedded_once(Path(cache_dir) / f"austen-bpe{vocab_size}", "", "bpe", vocab_size, log)


def _segment_seed(seed: int, index: int) -> int:
    """The shuffling seed of the training data's ``index``-th segment (0: the run's own seed)."""
    return seed + 7919 * index


def _training_stream(make, segments: list[int], seed: int):
    """The training samples of a run: segment i is the first ``segments[i]`` samples of ``make(n, seed_i)``.
    A run starts with one segment of train_steps x global batch samples; a resumed run that needs more
    samples appends one, so the samples already trained on keep their positions exactly (rebuilding one
    larger dataset would reshuffle them)."""
    parts = [torch.utils.data.Subset(make(n, _segment_seed(seed, i)), range(n)) for i, n in enumerate(segments)]
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _datasets(config: TrainConfig, dp_size: int, segments: list[int], log):
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
    if valid_prefix is None:  # hold out the last 1% of the documents
        n = train_ds.num_documents
        if n < 2:
            raise ValueError(f"{_FN}: --data {train_prefix} holds {n} document(s); holding out 1% of the documents "
                             "for validation needs at least 2: pass --valid-data (or prepare the text with "
                             "--document-unit paragraph or line)")
        cut = max(1, n - max(1, n // 100))
        train_docs, valid_docs, valid_ds = range(cut), range(cut, n), train_ds
    else:
        valid_ds = IndexedDataset(valid_prefix)
        train_docs, valid_docs = range(train_ds.num_documents), range(valid_ds.num_documents)
    cache = str(Path(config.cache_dir) / "index")

    def make(num_samples: int, seed: int):
        return GPTDataset(train_ds, train_docs, config.seq_len, num_samples, seed, cache_dir=cache, labels=True)

    train = _training_stream(make, segments, config.seed)
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


def _binary_head(model: str) -> bool:
    """Whether preset ``model`` pretrains with BERT's next-sentence head."""
    from megacore.models.registry import PRESETS

    return _family(model) == "bert" and getattr(PRESETS[model][0], "keywords", {}).get("head", "nsp") is not None


def embedded_corpus_wordpiece(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """The embedded corpus for masked-LM pretraining: a WordPiece tokenizer, cut as ``MASKED_LM_UNITS`` says,
    prepared once into ``cache_dir``."""
    return _prepare_embedded_once(Path(cache_dir) / f"austen-wordpiece{vocab_size}-paragraph-sentences",
                                  " (WordPiece, sentences)", "wordpiece", vocab_size, log, **MASKED_LM_UNITS)


def _masked_datasets(config: TrainConfig, family: str, binary_head: bool, dp_size: int, segments: list[int], log):
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
    train_indexed = IndexedDataset(train_prefix)

    def make(num_samples: int, seed: int):
        return cls(train_indexed, tokenizer, config.seq_len, seed=seed, num_samples=num_samples, **mode)

    train = _training_stream(make, segments, config.seed)
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
            batch = _to(_masked_batch(item), next(model.parameters()).device)
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


TOKENIZER_DIR = "tokenizer"  # the tokenizer's copy inside every checkpoint written by megacore train


def _read_extra(step_dir: str, fn: str) -> dict:
    from megacore.training.checkpoint import EXTRA_NAME

    path = os.path.join(step_dir, EXTRA_NAME)
    extra = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    if "model_config" not in extra:
        raise ValueError(f"megacore {fn}: {step_dir} was not written by `megacore train` (no model_config in its "
                         "extra)")
    # The tokenizer travels with the checkpoint (older checkpoints recorded an absolute path).
    copied = os.path.join(step_dir, TOKENIZER_DIR)
    extra["tokenizer"] = copied if os.path.exists(copied) else extra.get("tokenizer")
    if not extra["tokenizer"] or not os.path.exists(extra["tokenizer"]):
        raise FileNotFoundError(f"megacore {fn}: {step_dir} has no {TOKENIZER_DIR}/ and its recorded tokenizer "
                                f"{extra['tokenizer']} does not exist")
    return extra


def family_of_checkpoint(extra: dict) -> str:
    """"gpt", "bert" or "electra": the family of the preset a checkpoint was trained as."""
    return _family(extra["preset"])


def model_from_checkpoint(checkpoint: str, device=None):
    """(model in eval mode with the checkpoint's weights, tokenizer, the checkpoint's extra) for a checkpoint
    written by ``megacore train`` (a step directory, or the checkpoints root: its newest complete step).
    ``extra["tokenizer"]`` is the path of the tokenizer copy inside the checkpoint; ``extra["path"]`` the
    step directory."""
    from megacore.data import Tokenizer
    from megacore.models import ModelConfig
    from megacore.models.registry import PRESETS
    from megacore.parallel import state
    from megacore.training.checkpoint import load_checkpoint, resolve_checkpoint

    step_dir = resolve_checkpoint(checkpoint, "model_from_checkpoint")
    extra = _read_extra(step_dir, "model_from_checkpoint")
    fields = dict(extra["model_config"])
    fields["params_dtype"] = DTYPES[fields["params_dtype"]]
    fields["tensor_parallel"] = state.model_parallel_is_initialized() and state.get_tensor_parallel_world_size() > 1
    fields["sequence_parallel"] = False
    model_cls = PRESETS[extra["preset"]][0]
    model = model_cls(ModelConfig(**fields), device=device)
    load_checkpoint(step_dir, model, restore_rng=False)
    extra["path"] = step_dir
    return model.eval(), Tokenizer.load(extra["tokenizer"]), extra


def evaluate_checkpoint(checkpoint: str, batches: int = 50, passages: int = 200, context_tokens: int = 128) -> dict:
    """``megacore evaluate``: a checkpoint of ``megacore train`` on the embedded corpus's held-out novel
    (Persuasion), tokenized with the checkpoint's own tokenizer. Causal LMs: perplexity over ``batches``
    batches of 8 sequences and the LAMBADA-style accuracy of greedily predicting each of ``passages``
    passages' last word; masked LMs (BERT/RoBERTa): validation loss and MLM accuracy; ELECTRA: validation
    loss and the discriminator's accuracy. Returns the metrics with ``"checkpoint"`` (the step directory)."""
    from megacore.data import ElectraDataset, GPTDataset, IndexedDataset, MaskedLMDataset, corpus_files, read_text
    from megacore.data.prepare import prepare_dataset
    from megacore.training import last_word_accuracy, perplexity

    model, tokenizer, extra = model_from_checkpoint(checkpoint)
    family = family_of_checkpoint(extra)
    saved = extra.get("train_config") or {}
    seq = int(saved.get("seq_len", min(int(extra["model_config"]["max_position_embeddings"]), 256)))
    unit = {} if family == "gpt" else MASKED_LM_UNITS
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/valid"
        prepare_dataset(None, prefix, tokenizer=extra["tokenizer"], split="valid", progress=False,
                        log=lambda m: None, **unit)
        if family == "gpt":
            ds = GPTDataset(IndexedDataset(prefix), None, seq, batches * 8, 1, cache_dir=False, labels=True)
            ppl = perplexity(model, ds, 8, batches)
            text = read_text(corpus_files("valid")[0])
            acc = last_word_accuracy(model, tokenizer, text, passages, context_tokens)
            result = {"valid_loss": ppl["loss"], "valid_perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                      "last_word_accuracy": acc["accuracy"], "passages": acc["passages"]}
        else:
            binary_head = _binary_head(extra["preset"])
            cls = ElectraDataset if family == "electra" else MaskedLMDataset
            mode = {} if family == "electra" else {"mode": "nsp" if binary_head else "packed"}
            ds = cls(IndexedDataset(prefix), tokenizer, seq, seed=1, num_samples=batches * 8, **mode)
            result = _masked_eval(model, ds, family, 8, batches)
    return {**result, "checkpoint": extra["path"]}


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


def _resume_point(ckpt_root: Path, config: TrainConfig, explicit: Optional[set], log, auto=None):
    """(config, step, extra or None, step directory or None) of a run: the newest complete checkpoint under
    ``ckpt_root`` and the configuration it continues with (see config.resume_config; ``auto`` is what
    ``--dtype auto`` resolves to here), or step 0."""
    from megacore.training.checkpoint import latest_mismatch, newest_checkpoint

    step_dir = newest_checkpoint(ckpt_root)
    if step_dir is None:
        return config, 0, None, None
    extra = _read_extra(step_dir, "train")
    step = int(extra["step"])
    saved = extra.get("train_config")
    if saved is None:  # written before checkpoints carried their configuration
        path = ckpt_root.parent / "train_config.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
    config, notes = resume_config(saved, config, explicit, step, auto)
    mismatch = latest_mismatch(ckpt_root)
    log(f"megacore train: resuming from {step_dir} at step {step} (the newest complete checkpoint"
        + (f"; {mismatch})" if mismatch else ")"))
    for note in notes:
        log(f"megacore train: resume: {note}")
    return config, step, extra, step_dir


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


def _open_metrics(path: Path, keep_through_step: Optional[int]):
    """metrics.jsonl opened for appending, never through a symbolic link; on a resume the records of steps
    after the checkpoint (logged by the interrupted run, about to be logged again) are dropped first."""
    if path.is_symlink():
        raise ValueError(f"{_FN}: {path} is a symbolic link; refusing to write the metrics through it")
    if keep_through_step is not None and path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and record.get("step", 0) <= keep_through_step:
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return open(path, "a", encoding="utf-8", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o666))


def train(config: TrainConfig, log=print, explicit: Optional[set] = None) -> dict:
    """Runs ``megacore train``; returns the final metrics (validation loss/perplexity, the unigram baseline,
    tokens/s, the checkpoint path).

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
    from megacore.training import LRSchedule, MixedPrecision, Trainer, build_optimizer, perplexity
    from megacore.training.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
    from megacore.training.precision import DynamicLossScaler

    if not isinstance(config, TrainConfig):
        raise TypeError(f"{_FN}: config must be a TrainConfig, got {type(config).__name__}")
    if config.model not in PRESETS:
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
    config, step, resumed_extra, resumed_dir = _resume_point(ckpt_root, config, explicit, quiet_log, auto)
    dtype_shown = config.dtype
    if auto is not None:  # the run, its checkpoints and train_config.json record the resolved dtype
        if config.dtype == "auto":
            config = dataclasses.replace(config, dtype=auto[0])
        dtype_shown = (f"{config.dtype} (auto: {auto[1]})" if config.dtype == auto[0] else
                       f"{config.dtype} (the checkpoint's; auto would choose {auto[0]}: {auto[1]})")
    if config.model not in PRESETS:  # the checkpoint's model
        raise ValueError(f"{_FN}: the checkpoint's model {config.model!r} is not a known preset")
    if step >= config.train_steps:
        quiet_log(f"megacore train: {out} is already trained to step {step} (--train-steps {config.train_steps}); "
                  "nothing to do. Pass a larger --train-steps to train further.")
        return {"checkpoint": resumed_dir, "step": step, "already_trained": True}
    positions = _positions(config, quiet_log)
    _writable_directory(str(out), "--output")
    _writable_directory(config.cache_dir, "--cache-dir")
    family = _family(config.model)
    state = _init_distributed(config)
    tp, dp = (state.tensor_parallel_size, state.data_parallel_size) if state else (1, 1)
    dp_rank = state.data_parallel_rank if state else 0
    per_step = config.micro_batch_size * dp
    if config.global_batch_size % per_step:
        raise ValueError(f"{_FN}: --global-batch-size {config.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {config.micro_batch_size} x data-parallel size {dp}")
    accumulation = config.global_batch_size // per_step
    if main:
        for path in remove_stale_temporaries(ckpt_root):  # a killed or failed save's leftovers, before any write
            quiet_log(f"megacore train: removed {path}, left by an interrupted checkpoint save")

    # The data position, in samples: exact across resumes, whatever the batch size was.
    consumed = int(resumed_extra.get("consumed_samples", step * config.global_batch_size)) if resumed_extra else 0
    segments = [int(n) for n in resumed_extra.get("data_segments", [])] if resumed_extra else []
    if not segments and resumed_extra:  # checkpoints before data segments: the run's original size
        saved = resumed_extra.get("train_config") or {}
        segments = [int(saved.get("train_steps", config.train_steps)) * int(saved.get("global_batch_size",
                                                                                   config.global_batch_size))]
    needed = consumed + (config.train_steps - step) * config.global_batch_size
    if sum(segments) < needed:
        segments.append(needed - sum(segments))

    torch.manual_seed(config.seed)
    if family == "gpt":
        train_ds, valid_ds, tokenizer, tok_path, train_indexed = _datasets(config, dp, segments, quiet_log)
        to_batch, loss_fn = _batch, None
    else:
        binary_head = _binary_head(config.model)
        train_ds, valid_ds, tokenizer, tok_path = _masked_datasets(config, family, binary_head, dp, segments, quiet_log)
        to_batch, loss_fn, train_indexed = _masked_batch, _masked_loss, None
    overrides = dict(max_position_embeddings=positions, **config.model_overrides)
    overrides.update(vocab_size=tokenizer.vocab_size, hidden_dropout=config.hidden_dropout,
                     attention_dropout=config.attention_dropout, recompute=config.recompute,
                     tensor_parallel=state is not None, sequence_parallel=config.sequence_parallel)
    model = build(config.model, **overrides).to(device)  # drawn on CPU: the same weights on every device
    dtype = DTYPES[config.dtype]
    quiet_log(f"megacore train: {config.model}, steps {step + 1}-{config.train_steps} of {config.global_batch_size} x "
              f"{config.seq_len} tokens, {dtype_shown} on {device.type}, tensor-parallel {tp} x data-parallel {dp}; "
              f"output {out}")
    if dtype == torch.float16 and device.type == "cpu":
        quiet_log("megacore train: warning: float16 on a CPU is emulated (about 15x slower than float32 here); "
                  "use bfloat16 for half precision on CPUs")
    precision = MixedPrecision(model, dtype)
    ddp = DistributedDataParallel(model, grad_dtype=torch.float32) if dp > 1 else None
    optimizer = build_optimizer(precision, lr=config.lr, weight_decay=config.weight_decay)
    schedule = LRSchedule(optimizer, max_lr=config.lr, min_lr=config.min_lr,
                          warmup_steps=min(config.warmup_steps, config.train_steps), total_steps=config.train_steps)
    scaler = DynamicLossScaler() if dtype == torch.float16 else None
    trainer = Trainer(ddp or model, optimizer, schedule, precision=precision, scaler=scaler,
                      grad_accumulation=accumulation, clip=config.clip_grad, ddp=ddp, loss_fn=loss_fn,
                      max_skipped_steps=config.max_skipped_steps if scaler is not None else None,
                      loss_spike_factor=config.loss_spike_factor)

    if resumed_dir is not None:
        extra = load_checkpoint(resumed_dir, model, optimizer)
        schedule.load_state_dict(extra["schedule"])
        if schedule.total_steps != config.train_steps:
            schedule.reshape(total_steps=config.train_steps,
                             warmup_steps=min(schedule.warmup_steps, config.train_steps))
        if config.override_lr_schedule:
            schedule.reshape(max_lr=config.lr, min_lr=config.min_lr,
                             warmup_steps=min(config.warmup_steps, config.train_steps))
            for group in optimizer.param_groups:
                if group.get("weight_decay", 0) > 0:
                    group["weight_decay"] = config.weight_decay
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        trainer.step_count = step
    if main:
        with _naming(out / "train_config.json"):
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")

    model_config = dataclasses.asdict(model.config)
    model_config["params_dtype"] = config.dtype
    train_config = dataclasses.asdict(config)
    train_config["override_lr_schedule"] = False  # an instruction for one resume, not part of the run

    def extra_state(step_: int) -> dict:
        e = {"schedule": schedule.state_dict(), "preset": config.model, "model_config": model_config,
             "tokenizer": TOKENIZER_DIR, "tokenizer_source": tok_path, "consumed_samples": consumed, "step": step_,
             "data_segments": list(segments), "train_config": train_config}
        if scaler is not None:
            e["scaler"] = scaler.state_dict()
        return e

    def save(step_: int) -> str:
        with phase("megacore.checkpoint"), report_stalled_ranks(f"{_FN}: step {step_}: saving the checkpoint"):
            return save_checkpoint(ckpt_root, step_, model, optimizer, extra=extra_state(step_),
                                   keep_last=config.keep_last, files={TOKENIZER_DIR: tok_path})

    sampler = PretrainingSampler(len(train_ds), consumed, config.micro_batch_size, dp_rank, dp)
    loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=config.num_workers))
    metrics_file = _open_metrics(out / "metrics.jsonl", step if resumed_dir else None) if main else None
    tb = _tensorboard(out) if main else None
    bar = _progress(config, step, main)
    history = []
    start, tokens_done = time.perf_counter(), 0
    result = {}

    def evaluate(at: int) -> dict:
        with phase("megacore.evaluate"), report_stalled_ranks(f"{_FN}: step {at}: evaluation"):
            if family == "gpt":
                r = perplexity(ddp or model, valid_ds, config.micro_batch_size, config.eval_batches)
                record = {"step": at, "valid_loss": r["loss"], "valid_perplexity": r["perplexity"]}
            else:
                record = {"step": at, **_masked_eval(ddp or model, valid_ds, family, config.micro_batch_size,
                                                      config.eval_batches)}
        if not math.isfinite(record["valid_loss"]):
            raise TrainingDivergedError(at, f"step {at}: the validation loss is {record['valid_loss']}; the weights "
                                            "are not finite or overflow in evaluation. Nothing is saved")
        _write(metrics_file, tb, record)
        return record

    try:
        while step < config.train_steps:
            with phase("megacore.data"):
                micro = [_to(to_batch(next(loader)), device) for _ in range(accumulation)]
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
                _write(metrics_file, tb, record)
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


@contextlib.contextmanager
def _naming(path: Path):
    """Re-raises an OSError while writing ``path`` with the path and the command in its message."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{_FN}: cannot write {path}: {(e.strerror or str(e)).lower()}") from None


def _write(f, tb, record: dict) -> None:
    if f is not None:
        with _naming(Path(f.name)):
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


__all__ = ["TrainConfig", "embedded_corpus", "family_of_checkpoint", "load_config_file", "model_from_checkpoint",
           "parse_config", "train", "unigram_perplexity"]
