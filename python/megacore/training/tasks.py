"""Model families as tasks: everything ``megacore train`` and ``megacore evaluate`` do differently per family.

As in Megatron's ``pretrain(datasets_provider, model_provider, forward_step)``, the training loop
(``training/run.py``) is written once and never asks which family it trains; a :class:`Task` supplies the
rest::

    task = Task.for_preset("bert-tiny")                       # what the preset's model class declares
    data = task.datasets(config, data_parallel_size, segments, log)   # TaskData: train, valid, tokenizer, ...
    batch = task.batch(collated_item)                         # {"input_ids": int64 [b, s], ...}
    loss = task.loss(model, batch)                            # 0-dim fp32; the Trainer's loss_fn
    record = task.evaluate(model, data.valid, micro_batch_size, batches)  # {"valid_loss", task.metric}
    baseline = task.final_metrics(data, config)               # rank 0, after the last step ({} or more metrics)
    lines = task.report(result, checkpoints)                  # the run's last log lines

A model class declares the task it is pretrained with in its ``pretraining_task`` class attribute
(``GPTModel.pretraining_task == "causal_lm"``), and a task may read more from the model itself (BERT's
sentence-pair objective is its ``head_type``), so a preset needs no entry here: :meth:`Task.for_preset`
builds the preset on the meta device (nothing allocated, no random numbers drawn) and asks the model.
A new family (T5, XLNet, a fine-tuning task) is a Task subclass registered with :func:`register_task`;
the loop does not change.

(Pipeline parallelism will add one method: the forward of one pipeline stage to its outputs, or to the
loss on the last stage.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch

from megacore.training.corpus import MASKED_LM_UNITS, embedded_corpus, embedded_corpus_t5, embedded_corpus_wordpiece

_FN = "megacore train"
_NAME = "megacore.training.tasks"


# ---- what every task shares ------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """The data of a run, as :meth:`Task.datasets` builds it.

    Attributes:
        train: the training stream (:func:`training_stream`): items are dicts of arrays, collated by a
            DataLoader and passed to :meth:`Task.batch`.
        valid: the validation dataset :meth:`Task.evaluate` reads (at least ``eval_batches x
            micro_batch_size x data-parallel size`` items).
        tokenizer: the megacore Tokenizer of the data (its ``vocab_size`` sizes the model).
        tokenizer_path: the tokenizer directory (absolute), copied into every checkpoint.
        train_indexed: the training IndexedDataset (token statistics, e.g. the unigram baseline).
    """

    train: Any
    valid: Any
    tokenizer: Any
    tokenizer_path: str
    train_indexed: Any


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def segment_seed(seed: int, index: int) -> int:
    """The shuffling seed of the training data's ``index``-th segment (0: the run's own seed)."""
    return seed + 7919 * index


def training_stream(make: Callable[[int, int], Any], segments: list[int], seed: int):
    """The training samples of a run: segment i is the first ``segments[i]`` samples of
    ``make(num_samples, seed_i)`` (seed_i from :func:`segment_seed`).

    A run starts with one segment of train_steps x global batch samples; a resumed run that needs more
    samples appends one, so the samples already trained on keep their positions exactly (rebuilding one
    larger dataset would reshuffle them)."""
    parts = [torch.utils.data.Subset(make(n, segment_seed(seed, i)), range(n)) for i, n in enumerate(segments)]
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _corpus(config, embedded: Callable, log) -> tuple[str, Optional[str], Any, str]:
    """(train prefix, valid prefix or None, tokenizer, absolute tokenizer path) of a run: ``--data`` (and
    ``--valid-data``, ``--tokenizer``) when given, else the embedded corpus as ``embedded`` prepares it.
    Raises FileNotFoundError when the tokenizer does not exist."""
    from megacore.data import Tokenizer

    if config.data is None:
        train_prefix, valid_prefix, tok_path = embedded(config.cache_dir, config.vocab_size, log)
    else:
        train_prefix, valid_prefix = config.data, config.valid_data
        tok_path = config.tokenizer or config.data + ".tokenizer"
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"{_FN}: tokenizer {tok_path} does not exist (pass --tokenizer)")
    return train_prefix, valid_prefix, Tokenizer.load(tok_path), os.path.abspath(tok_path)


class Task:
    """How one model family is trained and evaluated (see the module's docstring).

    Class attributes:
        name: the registry key, the value of a model class's ``pretraining_task``.
        family: the model family, as checkpoints and logs name it (``family_of_checkpoint``).
        metric: the key of the family's own validation metric in :meth:`evaluate`'s result.
        corpus_units: how the embedded corpus is cut into documents and sequences for this task
            (``prepare_dataset``'s keyword arguments; ``megacore evaluate`` prepares the held-out novel so).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    metric: ClassVar[str]
    corpus_units: ClassVar[dict] = {}
    # The command's defaults for a run of this task, over TrainConfig's (the command line and --config override
    # them; a resumed run keeps its checkpoint's): ``megacore train`` reads the model's pretraining task's,
    # ``megacore finetune TASK`` the task's.
    defaults: ClassVar[dict] = {}

    # -- choosing the task

    @staticmethod
    def for_model(model: torch.nn.Module) -> "Task":
        """The task ``model`` declares (its ``pretraining_task``), configured from the model.
        Raises ValueError for a model that declares no registered task."""
        name = getattr(model, "pretraining_task", None)
        if name not in TASKS:
            raise ValueError(f"{_NAME}: {type(model).__name__} declares pretraining_task={name!r}; megacore "
                             f"train knows the tasks {', '.join(sorted(TASKS))} (register one with register_task)")
        return TASKS[name].from_model(model)

    @staticmethod
    def for_preset(name: str) -> "Task":
        """The task of preset ``name`` (megacore.models.registry.PRESETS), read from its model built on the
        meta device. Raises ValueError for an unknown preset or one without a registered task."""
        from megacore.models.registry import build

        return Task.for_model(build(name, device="meta"))

    @staticmethod
    def class_for_preset(name: str) -> Optional[type["Task"]]:
        """The Task class preset ``name``'s model class declares (its ``pretraining_task``), read from the class
        without building the model (its class-level settings, such as ``defaults``); None for an unknown preset
        or one that declares no registered task."""
        from megacore.models.registry import PRESETS

        if name not in PRESETS:
            return None
        model = PRESETS[name][0]
        model = getattr(model, "func", model)  # a functools.partial of a model class
        return TASKS.get(getattr(model, "pretraining_task", None))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Task":
        """This task for ``model`` (override to read settings from the model; default: ``cls()``)."""
        return cls()

    @staticmethod
    def for_run(name: Optional[str], options: dict, model: torch.nn.Module) -> "Task":
        """The task a run trains ``model`` with: its pretraining task when ``name`` is None, else the registered
        task ``name`` (a fine-tuning task: ``megacore finetune NAME``) with its ``options``. Raises ValueError for
        an unknown task, a model the task cannot train, or bad options."""
        if name is None:
            if options:
                raise ValueError(f"{_FN}: task options {sorted(options)} need a task (megacore finetune TASK)")
            return Task.for_model(model)
        if name not in TASKS:
            raise ValueError(f"{_FN}: unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        cls = TASKS[name]
        if not cls.accepts(model):
            raise ValueError(f"{_FN}: task {name!r} cannot train a {type(model).__name__} "
                             f"({cls.accepts.__doc__.strip().splitlines()[0]})")
        return cls.from_options(dict(options), model)

    @classmethod
    def accepts(cls, model: torch.nn.Module) -> bool:
        """A model whose pretraining task this is."""
        return getattr(model, "pretraining_task", None) == cls.name

    _OPTIONS: ClassVar[Optional[dict]] = None  # a fine-tuning task's options (name -> type), its constructor's

    @classmethod
    def from_options(cls, options: dict, model: torch.nn.Module) -> "Task":
        """This task with ``options`` (``TrainConfig.task_options``) for ``model``: ``cls(**options)`` for a task that
        declares its options (``_OPTIONS``), else none (:meth:`from_model`). Raises ValueError naming an unknown or
        bad option."""
        if cls._OPTIONS is None:
            if options:
                raise ValueError(f"{_FN}: task {cls.name!r} takes no options; got {', '.join(sorted(options))}")
            return cls.from_model(model)
        unknown = sorted(set(options) - set(cls._OPTIONS))
        if unknown:
            raise ValueError(f"{_FN}: task {cls.name!r} has no option {unknown[0]!r}; its options: "
                             f"{', '.join(sorted(cls._OPTIONS))}")
        return cls(**options)

    # -- training

    def datasets(self, config, data_parallel_size: int, segments: list[int], log) -> TaskData:
        """The run's data: the training stream of ``segments`` (see :func:`training_stream`) and the
        validation set of ``config.eval_batches x config.micro_batch_size x data_parallel_size`` samples,
        from ``config.data`` or the embedded corpus (prepared into ``config.cache_dir`` once; ``log`` says
        so). Raises ValueError / FileNotFoundError for unusable data."""
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module, data: TaskData) -> torch.nn.Module:
        """The model this task trains, from the model the run starts with (a preset, a pretrained checkpoint's or a
        Hugging Face directory's), once the data is read: a fine-tuning task puts its head on it (default: the
        model as it is)."""
        return model

    def batch(self, item: dict) -> dict:
        """A collated DataLoader item of ``TaskData.train`` / ``valid`` as the micro-batch :meth:`loss`
        reads: a dict of int64 tensors ``[b, s]`` (or ``[b]``)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Forward of one micro-batch to its loss (a 0-dim fp32 tensor) on this process: the Trainer's
        ``loss_fn``. ``model`` may be the DistributedDataParallel wrapper."""
        raise NotImplementedError

    def output_loss(self, output, batch: dict) -> torch.Tensor:
        """Under pipeline parallelism, the last stage's loss of one micro-batch from the model's
        ``stage_output`` (0-dim fp32); with the first stage's input-part loss (ELECTRA's generator) it sums to
        :meth:`loss`. Default: ``output.loss``."""
        return output.loss

    # -- evaluation

    def eval_counts(self, model: torch.nn.Module, output, acts: tuple, batch: dict) -> dict:
        """Under pipeline parallelism, the last stage's sums for one evaluation batch from its ``stage_output``
        ``output`` (and the last layer's ``acts``): ``{name: float}``, added over batches and stages and turned
        into metrics by :meth:`eval_metrics`. ``"loss_sum"`` / ``"batches"`` are filled in by
        :meth:`evaluate_pipeline` (the batches' summed loss over the stages) unless given here."""
        raise NotImplementedError

    def eval_metrics(self, sums: dict) -> dict:
        """``{"valid_loss", self.metric}`` from :meth:`eval_counts`'s sums over the batches."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_pipeline(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """:meth:`evaluate` for a model cut into pipeline stages (``megacore.parallel.pipeline.cut_stage``): the
        first ``batches`` batches run forward through the stages as one forward-only schedule; the last stage
        counts (:meth:`eval_counts`), the sums are added over the pipeline group, and every rank returns the
        same metrics. Every data-parallel rank evaluates the same batches."""
        from megacore.parallel import pipeline, state
        from megacore.parallel.collectives import all_reduce

        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size)
        micro = [to_device(self.batch(item), device) for _, item in zip(range(batches), loader)]
        sums: dict[str, float] = {}

        def count(microbatch: int, output, acts: tuple) -> None:
            for key, value in self.eval_counts(inner, output, acts, micro[microbatch]).items():
                sums[key] = sums.get(key, 0.0) + float(value)

        was_training = inner.training
        inner.eval()
        try:
            losses = pipeline.forward_backward(inner, micro, lambda loss: loss, self.output_loss, forward_only=True,
                                               on_output=count)
        finally:
            inner.train(was_training)
        keys = sorted(set(self.eval_keys) | {"loss_sum", "batches"})
        local = [sums.get(k, 0.0) for k in keys]
        if "loss_sum" not in sums:  # every stage's part of each batch's loss (ELECTRA: the generator's on stage 0)
            local[keys.index("loss_sum")] = float(sum(float(x) for x in losses))
        if "batches" not in sums and inner.pipeline.holds_last:
            local[keys.index("batches")] = float(len(micro))
        totals = torch.tensor(local, dtype=torch.float64)
        if inner.pipeline.size > 1:
            totals = all_reduce(totals, state.get_pipeline_parallel_group())
        return self.eval_metrics(dict(zip(keys, totals.tolist())))

    eval_keys: ClassVar[tuple[str, ...]] = ()  # the keys eval_counts returns

    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """Validation of ``model`` over the first ``batches`` batches of ``micro_batch_size`` samples of
        ``dataset`` (in eval mode; the mode is restored): ``{"valid_loss": float, self.metric: float}``."""
        raise NotImplementedError

    def evaluation_dataset(self, prefix: str, tokenizer, seq_len: int, num_samples: int):
        """The dataset ``megacore evaluate`` reads from the held-out text prepared at ``prefix`` (with
        ``corpus_units``): ``num_samples`` samples of ``seq_len`` tokens, drawn with seed 1."""
        raise NotImplementedError

    def evaluate_held_out(self, model: torch.nn.Module, tokenizer, dataset, micro_batch_size: int, batches: int,
                          passages: int, context_tokens: int) -> dict:
        """``megacore evaluate``'s metrics of ``model`` on :meth:`evaluation_dataset`'s ``dataset`` (default:
        :meth:`evaluate`; ``passages`` and ``context_tokens`` are for tasks that also read the text)."""
        return self.evaluate(model, dataset, micro_batch_size, batches)

    # -- the run's end

    def final_metrics(self, data: TaskData, config) -> dict:
        """Metrics computed once after the last step, on rank 0, logged as one record of the last step
        (default: none)."""
        return {}

    def final_evaluation(self, model: torch.nn.Module, data: TaskData, config) -> dict:
        """Metrics computed once after the last step by every rank (they may run collectives, e.g. decoding a
        tensor-parallel model), logged by rank 0 as one record of the last step (default: none)."""
        return {}

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        """The last lines ``megacore train`` logs: ``result`` is the final validation record (with
        ``step``), :meth:`final_metrics`, ``tokens_per_second`` and ``checkpoint`` (the step directory);
        ``checkpoints`` the run's checkpoint root."""
        raise NotImplementedError


# name -> Task subclass; see register_task
TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Registers a Task subclass under its ``name`` (usable as a class decorator); a model class whose
    ``pretraining_task`` is that name then trains with it. Raises ValueError if the name is taken."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"{_NAME}.register_task: expected a Task subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_NAME}.register_task: {cls.__name__} has no name (a non-empty str class attribute)")
    if name in TASKS:
        raise ValueError(f"{_NAME}.register_task: task {name!r} is already registered ({TASKS[name].__name__})")
    TASKS[name] = cls
    return cls


# ---- causal language models (GPT) ------------------------------------------------------------------------


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


class _First:
    """The first ``n`` items of a dataset, for the unigram baseline over the same tokens as evaluation."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


@register_task
class CausalLMTask(Task):
    """GPT pretraining: next-token prediction on GPTDataset samples (``--data`` with the last 1% of its
    documents held out when no ``--valid-data`` is given); validation perplexity, against a unigram
    baseline at the end; ``megacore evaluate`` adds the LAMBADA-style last-word accuracy."""

    name = "causal_lm"
    family = "gpt"
    metric = "valid_perplexity"

    def datasets(self, config, data_parallel_size: int, segments: list[int], log) -> TaskData:
        from megacore.data import GPTDataset, IndexedDataset

        train_prefix, valid_prefix, tokenizer, tok_path = _corpus(config, embedded_corpus, log)
        train_ds = IndexedDataset(train_prefix)
        if valid_prefix is None:  # hold out the last 1% of the documents
            n = train_ds.num_documents
            if n < 2:
                raise ValueError(f"{_FN}: --data {train_prefix} holds {n} document(s); holding out 1% of the "
                                 "documents for validation needs at least 2: pass --valid-data (or prepare the "
                                 "text with --document-unit paragraph or line)")
            cut = max(1, n - max(1, n // 100))
            train_docs, valid_docs, valid_ds = range(cut), range(cut, n), train_ds
        else:
            valid_ds = IndexedDataset(valid_prefix)
            train_docs, valid_docs = range(train_ds.num_documents), range(valid_ds.num_documents)
        cache = str(Path(config.cache_dir) / "index")

        def make(num_samples: int, seed: int):
            return GPTDataset(train_ds, train_docs, config.seq_len, num_samples, seed, cache_dir=cache, labels=True)

        train = training_stream(make, segments, config.seed)
        valid = GPTDataset(valid_ds, valid_docs, config.seq_len,
                           config.eval_batches * config.micro_batch_size * data_parallel_size, config.seed + 1,
                           cache_dir=cache, labels=True)
        return TaskData(train, valid, tokenizer, tok_path, train_ds)

    def batch(self, item: dict) -> dict:
        """``{"input_ids": int64 [b, s], "labels": int64 [b, s]}`` (labels: the next tokens, -100 ignored)."""
        return {"input_ids": item["tokens"].long(), "labels": item["labels"].long()}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The mean next-token loss over the counted labels (``masked_mean_loss``)."""
        from megacore.training.trainer import masked_mean_loss

        return masked_mean_loss(model, batch)

    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """``{"valid_loss", "valid_perplexity"}`` by ``megacore.training.perplexity`` (its batches shared out
        over the data-parallel ranks)."""
        from megacore.training.evaluate import perplexity

        r = perplexity(model, dataset, micro_batch_size, batches)
        return {"valid_loss": r["loss"], "valid_perplexity": r["perplexity"]}

    eval_keys = ("loss_sum", "tokens")

    def output_loss(self, output, batch: dict) -> torch.Tensor:
        """The mean of the per-token loss ``output [b, s]`` over the counted labels (as :meth:`loss`)."""
        from megacore.parallel.pipeline import default_output_loss

        return default_output_loss(output, batch)

    def eval_counts(self, model, output, acts, batch: dict) -> dict:
        counted = batch["labels"] != -100
        return {"loss_sum": float(output.double().masked_fill(~counted, 0.0).sum()), "tokens": int(counted.sum())}

    def eval_metrics(self, sums: dict) -> dict:
        loss = sums["loss_sum"] / max(sums["tokens"], 1.0)  # token-weighted, as megacore.training.perplexity
        return {"valid_loss": loss, "valid_perplexity": math.exp(min(loss, 700.0))}

    def evaluation_dataset(self, prefix: str, tokenizer, seq_len: int, num_samples: int):
        from megacore.data import GPTDataset, IndexedDataset

        return GPTDataset(IndexedDataset(prefix), None, seq_len, num_samples, 1, cache_dir=False, labels=True)

    def evaluate_held_out(self, model: torch.nn.Module, tokenizer, dataset, micro_batch_size: int, batches: int,
                          passages: int, context_tokens: int) -> dict:
        """Perplexity (with the tokens counted) and the last-word accuracy on the held-out novel's text."""
        from megacore.data import corpus_files, read_text
        from megacore.training.evaluate import last_word_accuracy, perplexity

        ppl = perplexity(model, dataset, micro_batch_size, batches)
        text = read_text(corpus_files("valid")[0])
        acc = last_word_accuracy(model, tokenizer, text, passages, context_tokens)
        return {"valid_loss": ppl["loss"], "valid_perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                "last_word_accuracy": acc["accuracy"], "passages": acc["passages"]}

    def final_metrics(self, data: TaskData, config) -> dict:
        """``{"unigram_perplexity"}`` on the validation tokens the last evaluation read."""
        vocab = data.tokenizer.vocab_size
        counts = _token_counts(data.train_indexed, vocab)
        return {"unigram_perplexity": unigram_perplexity(_First(data.valid, config.eval_batches *
                                                                config.micro_batch_size), vocab, counts)}

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        return [f"megacore train: step {result['step']}: validation loss {result['valid_loss']:.3f}, perplexity "
                f"{result['valid_perplexity']:.1f} (a unigram model: {result['unigram_perplexity']:.1f}); "
                f"{result['tokens_per_second']:,.0f} tokens/s",
                f"megacore train: checkpoint {result['checkpoint']}\n"
                f"  generate from it:  megacore generate --checkpoint {checkpoints} --prompt \"It is a truth\"\n"
                f"  evaluate it:       megacore evaluate --checkpoint {checkpoints}"]


# ---- masked language models (BERT, RoBERTa) and ELECTRA ------------------------------------------------


class _EncoderPretraining(Task):
    """What masked-LM and ELECTRA pretraining share: WordPiece data cut into sentences (MASKED_LM_UNITS),
    ``--valid-data`` required with ``--data``, the model's own loss, and an accuracy counted per batch."""

    corpus_units = MASKED_LM_UNITS
    embedded = staticmethod(embedded_corpus_wordpiece)  # the embedded corpus as the task reads it

    def _dataset(self, indexed, tokenizer, seq_len: int, seed: int, num_samples: int):
        raise NotImplementedError

    def _accuracy_counts(self, model, batch: dict, out) -> tuple[int, int]:
        """(correct, counted) of the metric in one evaluation batch, whose forward gave ``out``."""
        raise NotImplementedError

    def datasets(self, config, data_parallel_size: int, segments: list[int], log) -> TaskData:
        from megacore.data import IndexedDataset

        if config.data is not None and config.valid_data is None:
            raise ValueError(f"{_FN}: {self.family} pretraining on --data needs --valid-data too")
        train_prefix, valid_prefix, tokenizer, tok_path = _corpus(config, self.embedded, log)
        train_indexed = IndexedDataset(train_prefix)

        def make(num_samples: int, seed: int):
            return self._dataset(train_indexed, tokenizer, config.seq_len, seed, num_samples)

        train = training_stream(make, segments, config.seed)
        valid = self._dataset(IndexedDataset(valid_prefix), tokenizer, config.seq_len, config.seed + 1,
                              config.eval_batches * config.micro_batch_size * data_parallel_size)
        return TaskData(train, valid, tokenizer, tok_path, train_indexed)

    def batch(self, item: dict) -> dict:
        """The collated sample as the model's keyword arguments, int64 (``original_ids`` is only for
        inspection: ELECTRA recovers the originals from ``mlm_labels``)."""
        return {k: v.long() for k, v in item.items() if k != "original_ids"}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The model's own loss (``model(**batch).loss``)."""
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """The mean validation loss over the batches, and ``metric``: correct / counted over all of them.
        Every rank evaluates the same batches."""
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size)
        loss_sum, correct, total, n = 0.0, 0, 0, 0
        try:
            for i, item in enumerate(loader):
                if i >= batches:
                    break
                batch = to_device(self.batch(item), next(model.parameters()).device)
                out = model(**batch)
                loss_sum += float(out.loss)
                n += 1
                c, t = self._accuracy_counts(model, batch, out)
                correct += c
                total += t
        finally:
            model.train(was_training)
        return {"valid_loss": loss_sum / max(n, 1), self.metric: correct / max(total, 1)}

    eval_keys = ("correct", "counted")

    def eval_metrics(self, sums: dict) -> dict:
        return {"valid_loss": sums["loss_sum"] / max(sums["batches"], 1.0),
                self.metric: sums["correct"] / max(sums["counted"], 1.0)}

    def evaluation_dataset(self, prefix: str, tokenizer, seq_len: int, num_samples: int):
        from megacore.data import IndexedDataset

        return self._dataset(IndexedDataset(prefix), tokenizer, seq_len, 1, num_samples)

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        return [f"megacore train: step {result['step']}: validation loss {result['valid_loss']:.3f}, "
                f"{self.metric.replace('_', ' ')} {result[self.metric]:.3f}; "
                f"{result['tokens_per_second']:,.0f} tokens/s",
                f"megacore train: checkpoint {result['checkpoint']} (load it with "
                "megacore.training.run.model_from_checkpoint, or carry it to transformers with "
                "megacore.interop.hf.to_hf)"]


@register_task
class MaskedLMTask(_EncoderPretraining):
    """BERT / RoBERTa pretraining on MaskedLMDataset samples: with sentence pairs (``"nsp"`` or ``"sop"``,
    for a model with that binary head) or packed sentences (``None``: RoBERTa); validation MLM accuracy
    (the argmax at the masked positions)."""

    name = "masked_lm"
    family = "bert"
    metric = "mlm_accuracy"
    # A post-LN masked LM sits at the unigram plateau (validation loss = the unigram cross-entropy) until its
    # attention learns to read the neighbours; at TrainConfig's GPT recipe (lr 2e-3, 8 x 256) bert-tiny is still
    # there after 2,000 steps. 128-token samples (most of the embedded corpus's paragraphs are shorter), 32 per
    # step, lr 1e-3 with 500 warmup steps start to leave it after ~3,000 steps; at 5,000 bert-tiny is past it
    # (6.29 against 6.42) and fine-tunes better than from scratch (docs/finetuning.md).
    defaults: ClassVar[dict] = {"seq_len": 128, "micro_batch_size": 32, "global_batch_size": 32, "train_steps": 5000,
                                "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 500, "eval_interval": 1000,
                                "save_interval": 2500}

    def __init__(self, sentence_pairs: Optional[str] = "nsp"):
        if sentence_pairs not in ("nsp", "sop", None):
            raise ValueError(f"{_NAME}.MaskedLMTask: sentence_pairs={sentence_pairs!r} is not 'nsp', 'sop' or None")
        self.sentence_pairs = sentence_pairs

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "MaskedLMTask":
        """Sentence pairs as the model's binary head (``head_type``: "nsp", "sop" or None) asks."""
        return cls(model.head_type)

    def _dataset(self, indexed, tokenizer, seq_len: int, seed: int, num_samples: int):
        from megacore.data import MaskedLMDataset

        return MaskedLMDataset(indexed, tokenizer, seq_len, seed=seed, num_samples=num_samples,
                               mode=self.sentence_pairs or "packed")

    def _accuracy_counts(self, model, batch: dict, out) -> tuple[int, int]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).mlm  # [b, s, v]
        return self._correct(logits, batch)

    @staticmethod
    def _correct(logits: torch.Tensor, batch: dict) -> tuple[int, int]:
        masked = batch["labels"] != -100
        return int(((logits.argmax(-1) == batch["labels"]) & masked).sum()), int(masked.sum())

    def eval_counts(self, model, output, acts, batch: dict) -> dict:
        logits = model.stage_output(acts, {**batch, "labels": None, "next_sentence_label": None}).mlm  # [b, s, v]
        correct, counted = self._correct(logits, batch)
        return {"correct": correct, "counted": counted}


@register_task
class ElectraTask(_EncoderPretraining):
    """ELECTRA pretraining on ElectraDataset samples (packed sentences); validation accuracy of the
    discriminator ("replaced or not") over the real tokens."""

    name = "electra"
    family = "electra"
    metric = "discriminator_accuracy"

    def _dataset(self, indexed, tokenizer, seq_len: int, seed: int, num_samples: int):
        from megacore.data import ElectraDataset

        return ElectraDataset(indexed, tokenizer, seq_len, seed=seed, num_samples=num_samples)

    def _accuracy_counts(self, model, batch: dict, out) -> tuple[int, int]:
        return self._correct(out.discriminator_logits, out.discriminator_labels, batch)

    @staticmethod
    def _correct(logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> tuple[int, int]:
        real = batch["attention_mask"].bool()
        guess = logits.float() > 0
        return int(((guess == labels) & real).sum()), int(real.sum())

    def eval_counts(self, model, output, acts, batch: dict) -> dict:
        correct, counted = self._correct(output.logits, output.labels, batch)
        return {"correct": correct, "counted": counted}


# ---- encoder-decoders (T5) ----------------------------------------------------------------------------------


class EncoderDecoderTask(Task):
    """What the encoder-decoder tasks share (span corruption, translation, seq2seq): batches of ``input_ids``,
    ``attention_mask`` and ``labels``; the loss is the mean per-token loss over the counted targets; evaluation
    counts the loss and the argmax accuracy over them (``target_accuracy``), token-weighted."""

    family = "t5"

    def batch(self, item: dict) -> dict:
        """``{"input_ids": [b, s], "attention_mask": [b, s], "labels": [b, t]}``, int64."""
        return {k: item[k].long() for k in ("input_ids", "attention_mask", "labels")}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The mean per-token loss over the counted target tokens."""
        per_token = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
        return self.output_loss(per_token, batch)

    def output_loss(self, output, batch: dict) -> torch.Tensor:
        from megacore.parallel.pipeline import default_output_loss

        return default_output_loss(output, batch)

    @staticmethod
    def _counts(logits: torch.Tensor, labels: torch.Tensor) -> dict:
        """Sums of one evaluation batch from its logits ``[b, t, vocab]``: the loss over the counted targets,
        the correct argmaxes, the counted targets."""
        counted = labels != -100
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="sum")
        correct = (logits.argmax(-1) == labels) & counted
        return {"loss_sum": float(loss), "correct": int(correct.sum()), "counted": int(counted.sum())}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """``{"valid_loss", "target_accuracy"}`` over the first ``batches`` batches, both over the target tokens
        (token-weighted). Every rank evaluates the same batches."""
        inner = getattr(model, "module", model)
        was_training = inner.training
        inner.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size)
        sums = {"loss_sum": 0.0, "correct": 0, "counted": 0}
        try:
            for _, item in zip(range(batches), loader):
                batch = to_device(self.batch(item), next(inner.parameters()).device)
                logits = inner(batch["input_ids"], decoder_input_ids=inner.shift_right(batch["labels"]),
                               attention_mask=batch["attention_mask"])
                for key, value in self._counts(logits, batch["labels"]).items():
                    sums[key] += value
        finally:
            inner.train(was_training)
        return self._metrics(sums)

    eval_keys = ("loss_sum", "correct", "counted")

    def eval_counts(self, model, output, acts, batch: dict) -> dict:
        return self._counts(model.stage_output(acts, {**batch, "labels": None}), batch["labels"])

    def _metrics(self, sums: dict) -> dict:
        return {"valid_loss": sums["loss_sum"] / max(sums["counted"], 1.0),
                "target_accuracy": sums["correct"] / max(sums["counted"], 1.0)}

    def eval_metrics(self, sums: dict) -> dict:
        return self._metrics(sums)


@register_task
class SpanCorruptionTask(EncoderDecoderTask, _EncoderPretraining):
    """T5 pretraining on SpanCorruptionDataset samples (``--seq-len`` is the encoder's length; the targets' length
    follows from it, 256 -> 58): the embedded corpus is the novels and both sides of the Bible corpus with a
    bilingual Unigram tokenizer with sentinels (``embedded_corpus_t5``); ``--data`` needs a tokenizer with sentinel
    tokens (``megacore prepare --train-tokenizer unigram``). The loss is the mean over the target tokens; the
    metric is the accuracy of the argmax over them (sentinels and ``</s>`` included)."""

    name = "span_corruption"
    metric = "target_accuracy"
    embedded = staticmethod(embedded_corpus_t5)

    def _dataset(self, indexed, tokenizer, seq_len: int, seed: int, num_samples: int):
        from megacore.data import SpanCorruptionDataset

        return SpanCorruptionDataset(indexed, tokenizer, seq_len, seed=seed, num_samples=num_samples)

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        return [f"megacore train: step {result['step']}: validation loss {result['valid_loss']:.3f}, target "
                f"accuracy {result['target_accuracy']:.3f}; {result['tokens_per_second']:,.0f} tokens/s",
                f"megacore train: checkpoint {result['checkpoint']}\n"
                f"  fine-tune it for translation:  megacore finetune translation --checkpoint {checkpoints}\n"
                f"  evaluate it:                   megacore evaluate --checkpoint {checkpoints}"]


__all__ = ["CausalLMTask", "ElectraTask", "EncoderDecoderTask", "MaskedLMTask", "SpanCorruptionTask", "TASKS", "Task", "TaskData", "register_task",
           "segment_seed", "to_device", "training_stream", "unigram_perplexity"]


# The fine-tuning tasks register themselves (megacore finetune translation | seq2seq | austen-novel | ...).
from megacore.training import classification as _classification  # noqa: E402,F401
from megacore.training import seq2seq as _seq2seq  # noqa: E402,F401
