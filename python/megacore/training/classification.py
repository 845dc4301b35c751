"""Fine-tuning an encoder (BERT, RoBERTa, ELECTRA's discriminator) or GPT to classify texts, text pairs or tokens:
``megacore finetune austen-novel | bible-pair | proper-nouns | classify``, tasks of the one training loop
(``tasks.py``): the same progress bar, metrics, checkpoints and resume as pretraining.

A run starts from a ``megacore train`` checkpoint (``TrainConfig.pretrained``), a Hugging Face directory
(``TrainConfig.hf_model``) or a preset from scratch; the task puts its head on the model
(``megacore.models.Classifier.from_pretrained_model``: the trunk's weights, a new head). From scratch, the tokenizer
is the one the preset's pretraining would use on the embedded corpus (prepared once into ``--cache-dir``), so a
scratch run and a run from that pretraining differ only in the weights: the comparison the ELECTRA paper makes.

Tasks (data: ``megacore.data.classification``):

- ``austen-novel``: which of the six novels a passage of a few sentences comes from (6 classes; chapters held out);
- ``bible-pair``: is the English verse the translation of the Spanish one, or a mismatch (sentence pairs; books held
  out, as the translation task's);
- ``proper-nouns``: tag each word of a passage ``NAME`` or ``O`` (token classification; the WordPiece lower-cases, so
  the model must know names from context and from the words themselves);
- ``classify``: the user's JSONL / CSV / TSV files (``text``, optional ``text_pair``, ``label``; names configurable),
  classification or, with ``regression``, a number per text.

Validation (every ``--eval-interval`` steps and at the end) reads the whole validation split (or ``eval_samples``):
loss, accuracy, macro-F1 and, for two classes, Matthews correlation (GLUE's metric for CoLA); regression: MSE,
Pearson and Spearman. At the end the same metrics on the test split, next to the majority-class baseline, and the
test predictions in ``test_predictions.jsonl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from megacore.training.tasks import _FN, Task, TaskData, _corpus, register_task, to_device, training_stream

_NAME = "megacore.training.classification"


# ---- the training stream ------------------------------------------------------------------------------------


class ShuffledEpochs(torch.utils.data.Dataset):
    """``num_samples`` samples of ``dataset``: epoch after epoch over its items, each epoch in its own order drawn
    from ``(seed, epoch)``, so sample ``i`` is a function of ``(seed, i)`` (reproducible, resumable at any sample,
    independent of loader workers)."""

    def __init__(self, dataset, num_samples: int, seed: int):
        if len(dataset) == 0:
            raise ValueError(f"{_NAME}.ShuffledEpochs: the dataset is empty")
        self.dataset, self.num_samples, self.seed = dataset, int(num_samples), int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{_NAME}.ShuffledEpochs: index {index} out of range for {self.num_samples} samples")
        epoch, position = divmod(int(index), len(self.dataset))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self.dataset[int(self._orders[epoch][position])]


def trim_batch(batch: dict) -> dict:
    """A collated batch cut to its longest row (rounded up to 16 positions): ``[b, s]`` tensors shortened, ``[b]``
    ones kept. Padding is on the right, so nothing real is cut."""
    used = batch["attention_mask"] != 0
    n = int(used.any(0).nonzero().max()) + 1 if used.any() else 1
    width = min(-(-n // 16) * 16, used.shape[1])
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


def _is_main() -> bool:
    from megacore.training.corpus import is_main_process

    return is_main_process()


# ---- the tasks ----------------------------------------------------------------------------------------------


class ClassificationTask(Task):
    """What the classification and tagging tasks share (module docstring). Subclasses say where the examples come
    from (:meth:`examples`) and which head they train (``head``: ``"sequence"`` or ``"token"``).

    Options (``TrainConfig.task_options``; ``megacore finetune``'s flags): ``truncation`` (cut texts longer than
    ``--seq-len``, the longer of a pair first; default: the embedded tasks cut, ``classify`` refuses such a text with
    its file and line), ``classifier_dropout`` (the head's dropout; default: the model's hidden dropout),
    ``eval_samples`` / ``test_samples`` (examples evaluated, evenly spaced through the split; default 0: all)."""

    family = "classifier"
    head: ClassVar[str] = "sequence"
    regression: bool = False
    metric = "valid_accuracy"
    default_truncation: ClassVar[bool] = True
    defaults: ClassVar[dict] = {"model": "bert-tiny", "seq_len": 128, "micro_batch_size": 32, "global_batch_size": 32,
                                "train_steps": 400, "lr": 1e-3, "min_lr": 0.0, "warmup_steps": 40,
                                "weight_decay": 0.01, "lr_decay_style": "linear", "layer_lr_decay": 0.8,
                                "eval_interval": 100, "eval_batches": 1, "save_interval": 200, "log_interval": 20}
    _OPTIONS: ClassVar[dict] = {"truncation": bool, "classifier_dropout": float, "eval_samples": int,
                                "test_samples": int}

    def __init__(self, truncation: Optional[bool] = None, classifier_dropout: Optional[float] = None,
                 eval_samples: int = 0, test_samples: int = 0):
        for name, value in (("eval_samples", eval_samples), ("test_samples", test_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{_FN}: task option {name}={value!r} must be an int >= 0")
        if truncation is not None and not isinstance(truncation, bool):
            raise ValueError(f"{_FN}: task option truncation={truncation!r} must be true or false")
        if classifier_dropout is not None and (isinstance(classifier_dropout, bool) or not
                                               isinstance(classifier_dropout, (int, float)) or
                                               not 0 <= classifier_dropout < 1):
            raise ValueError(f"{_FN}: task option classifier_dropout={classifier_dropout!r} must be in [0, 1)")
        self.truncation = self.default_truncation if truncation is None else truncation
        self.classifier_dropout = None if classifier_dropout is None else float(classifier_dropout)
        self.eval_samples, self.test_samples = eval_samples, test_samples
        self.labels = None  # the LabelSet, once the data is read (datasets) or the model is known (evaluation)
        self.metric = "valid_mse" if self.regression else "valid_accuracy"
        self.zero_token_types = False  # a model with one token type (RoBERTa, GPT) reads every token as type 0
        self.source_model = None  # the model the run starts from (meta device), for the scratch tokenizer

    @classmethod
    def accepts(cls, model: torch.nn.Module) -> bool:
        """a BERT, RoBERTa, ELECTRA or GPT model (a preset, checkpoint or Hugging Face directory; GPT has no
        token-classification head)"""
        from megacore.models.classification import backbone_of

        try:
            backbone = backbone_of(model)
        except ValueError:
            return False
        return not (cls.head == "token" and backbone == "gpt")

    @classmethod
    def from_options(cls, options: dict, model: torch.nn.Module) -> "ClassificationTask":
        task = super().from_options(options, model)
        task.source_model = model
        return task

    # -- data

    def examples(self, split: str) -> list:
        """The ``LabeledExample`` list of ``split`` ("train", "valid" or "test")."""
        raise NotImplementedError

    def label_set(self, train_examples: list):
        """The labels the head predicts: every label of the training examples (sorted)."""
        from megacore.data.classification import LabelSet

        return LabelSet.from_examples(train_examples, regression=self.regression)

    def tokenizer(self, config, log):
        """(tokenizer, its directory): the pretrained checkpoint's or Hugging Face directory's, else (from scratch)
        the one the preset's pretraining uses on the embedded corpus, prepared once into ``config.cache_dir``."""
        from megacore.data import Tokenizer
        from megacore.training.checkpoint import resolve_checkpoint
        from megacore.training.corpus import embedded_corpus
        from megacore.training.resume import _read_extra

        if config.pretrained is not None:
            path = _read_extra(resolve_checkpoint(config.pretrained, "finetune"), "finetune")["tokenizer"]
            return Tokenizer.load(path), os.path.abspath(path)
        if config.hf_model is not None:
            from megacore.training.hf_source import hf_tokenizer

            return hf_tokenizer(config.hf_model)
        pretraining = Task.for_model(self.source_model)
        embedded = getattr(pretraining, "embedded", embedded_corpus)
        _, _, tokenizer, path = _corpus(config, embedded, log)
        return tokenizer, path

    def datasets(self, config, data_parallel_size: int, segments: list[int], log) -> TaskData:
        if config.pipeline_parallel_size > 1:
            raise ValueError(f"{_FN}: task {self.name!r} does not run on pipeline stages yet: use "
                             "--pipeline-parallel-size 1 (tensor and data parallelism work)")
        train_examples, valid_examples = self.examples("train"), self.examples("valid")
        tokenizer, tok_path = self.tokenizer(config, log)
        self.labels = self.label_set(train_examples)
        self.tokenizer_, self.seq_len, self.output = tokenizer, config.seq_len, Path(config.output)
        train = self._encode(train_examples, "training")
        if train.truncated:
            log(f"megacore finetune: {train.truncated} of {len(train_examples):,} training examples are longer than "
                f"--seq-len {config.seq_len} tokens and are cut")
        valid = self._encode(self._first(valid_examples, self.eval_samples), "validation")
        stream = training_stream(lambda n, seed: ShuffledEpochs(train, n, seed), segments, config.seed)
        self.train_size = len(train_examples)
        return TaskData(stream, valid, tokenizer, tok_path, None)

    @staticmethod
    def _first(examples: list, n: int) -> list:
        """``n`` of the examples (0: all), evenly spaced through them: the splits are ordered (by novel, by book),
        so a prefix would hold only the first classes."""
        if not n or n >= len(examples):
            return examples
        return [examples[i * len(examples) // n] for i in range(n)]

    def _encode(self, examples: list, what: str):
        from megacore.data.classification import encode_examples

        try:
            return encode_examples(examples, self.tokenizer_, self.seq_len, self.labels, head=self.head,
                                   truncation=self.truncation, regression=self.regression)
        except ValueError as e:  # say it as megacore finetune's flag
            raise ValueError(str(e).replace("pass truncation=True to cut it",
                                            "pass --truncation to cut it, or a larger --seq-len")) from None

    def prepare_model(self, model: torch.nn.Module, data: TaskData) -> torch.nn.Module:
        """The model with this task's head: a Classifier from a pretrained trunk (kept as it is when the model is
        already a Classifier of this task's head and labels, e.g. a fine-tuned Hugging Face directory)."""
        from megacore.models.classification import Classifier

        problem_type = "regression" if self.regression else "single_label_classification"
        names = [] if self.regression else list(self.labels.names)
        num_labels = 1 if self.regression else len(names)
        self.zero_token_types = model.config.type_vocab_size < 2
        if isinstance(model, Classifier):
            c = model.config
            if c.head != self.head or c.num_labels != num_labels or list(c.label_names or names) != names:
                raise ValueError(f"{_FN}: the model is already a {c.head} classifier with labels "
                                 f"{c.label_names or c.num_labels}; task {self.name!r} needs a {self.head} head with "
                                 f"labels {names or num_labels} (start from a pretrained model without a head)")
            return model
        return Classifier.from_pretrained_model(model, head=self.head, num_labels=num_labels,
                                                problem_type=problem_type, label_names=names,
                                                classifier_dropout=self.classifier_dropout)

    def batch(self, item: dict) -> dict:
        """The collated examples as the Classifier's keyword arguments, cut to the longest row."""
        batch = {k: item[k].long() for k in ("input_ids", "attention_mask", "token_type_ids")}
        if self.zero_token_types:  # the second text of a pair is told apart by its separator alone
            batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
        batch["labels"] = item["labels"].float() if self.regression else item["labels"].long()
        return trim_batch(batch)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The model's loss: mean cross-entropy over the counted labels (MSE for regression)."""
        return model(**batch).loss

    # -- evaluation

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, dataset, micro_batch_size: int = 64) -> dict:
        """Every example of ``dataset`` through ``model`` (eval mode, restored after): ``{"loss": mean loss per
        batch-weighted example/token, "predictions": [...], "labels": [...], "probabilities": [...]}``; token tasks
        list the counted tokens only (labels != -100), in order. Every rank computes the same."""
        inner = getattr(model, "module", model)
        device = next(inner.parameters()).device
        was_training = inner.training
        inner.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size)
        loss_sum, counted = 0.0, 0
        predictions, labels, probabilities = [], [], []
        try:
            for item in loader:
                batch = to_device(self.batch(item), device)
                out = inner(**batch)
                logits = out.logits.float()
                target = batch["labels"]
                if self.regression:
                    n = target.numel()
                    predictions.append(logits[:, 0].cpu())
                    labels.append(target.cpu())
                else:
                    keep = target != -100
                    n = int(keep.sum())
                    probs = logits.softmax(-1)
                    predictions.append(probs.argmax(-1)[keep].cpu())
                    probabilities.append(probs.max(-1).values[keep].cpu())
                    labels.append(target[keep].cpu())
                loss_sum += float(out.loss) * n
                counted += n
        finally:
            inner.train(was_training)
        cat = (lambda xs: torch.cat(xs).tolist() if xs else [])
        return {"loss": loss_sum / max(counted, 1), "predictions": cat(predictions), "labels": cat(labels),
                "probabilities": cat(probabilities)}

    def scores(self, result: dict) -> dict:
        """The task's metrics of :meth:`predict`'s result (no prefix)."""
        from megacore.training.classification_metrics import classification_metrics, regression_metrics

        if self.regression:
            return regression_metrics(result["predictions"], result["labels"])
        return classification_metrics(result["predictions"], result["labels"], len(self.labels.names))

    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """``valid_loss`` and the metrics (``valid_accuracy``, ``valid_macro_f1``, ``valid_mcc`` for two classes;
        ``valid_mse``, ``valid_pearson``, ``valid_spearman`` for regression) over the whole validation set (or its
        first ``eval_samples``); every rank evaluates the same examples."""
        result = self.predict(model, dataset, max(micro_batch_size, 64))
        return {"valid_loss": result["loss"], **{f"valid_{k}": v for k, v in self.scores(result).items()}}

    def majority_baseline(self, train_examples: list, test_examples: list) -> dict:
        """The metrics of always predicting the training split's most frequent label (token tasks: tag), on the
        test examples; regression: of predicting the training mean."""
        from megacore.training.classification_metrics import classification_metrics, regression_metrics

        if self.regression:
            mean = float(np.mean([float(e.label) for e in train_examples]))
            targets = [float(e.label) for e in test_examples]
            return regression_metrics([mean] * len(targets), targets)

        def flat(examples):
            return [label for e in examples for label in (e.label if self.head == "token" else [e.label])]

        train_labels = flat(train_examples)
        majority = max(sorted(set(train_labels), key=str), key=train_labels.count)
        truth = [self.labels.id(label, "") for label in flat(test_examples)]
        return classification_metrics([self.labels.id(majority)] * len(truth), truth, len(self.labels.names))

    def final_evaluation(self, model: torch.nn.Module, data: TaskData, config) -> dict:
        """The metrics on the test split (``test_*``) and the majority-class baseline's (``majority_*``); the
        predictions go to ``test_predictions.jsonl`` (rank 0)."""
        from megacore._files import atomic_write_text

        test_examples = self._first(self.examples("test"), self.test_samples)
        result = self.predict(model, self._encode(test_examples, "test"), max(config.micro_batch_size, 64))
        out = {"test_examples": len(test_examples), "test_loss": result["loss"]}
        out.update({f"test_{k}": v for k, v in self.scores(result).items()})
        out.update({f"majority_{k}": v for k, v in self.majority_baseline(self.examples("train"),
                                                                           test_examples).items()})
        if _is_main():
            atomic_write_text(self.output / "test_predictions.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                      for r in self.prediction_records(test_examples, result)))
        return out

    def prediction_records(self, examples: list, result: dict) -> list[dict]:
        """One JSON record per example: its text(s), the label and the prediction (token tasks: per word)."""
        records, at = [], 0
        for e in examples:
            record: dict[str, Any] = {"text": e.text}
            if e.text_pair is not None:
                record["text_pair"] = e.text_pair
            if self.regression:
                record.update(label=float(e.label), prediction=result["predictions"][at])
                at += 1
            elif self.head == "token":
                n = len(e.label)
                tags = [self.labels.names[i] for i in result["predictions"][at:at + n]]
                record.update(words=list(e.words), labels=list(e.label), predictions=tags)
                at += n
            else:
                record.update(label=str(e.label), prediction=self.labels.names[result["predictions"][at]],
                              probability=result["probabilities"][at])
                at += 1
            records.append(record)
        return records

    def evaluation_dataset(self, prefix: str, tokenizer, seq_len: int, num_samples: int):
        raise ValueError(f"megacore evaluate: a {self.name} checkpoint is evaluated with --task {self.name} "
                         "(megacore evaluate --checkpoint DIR --task TASK)")

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        if self.regression:
            line = (f"test MSE {result['test_mse']:.4f}, Pearson {result['test_pearson']:.3f}, Spearman "
                    f"{result['test_spearman']:.3f} (predicting the training mean: MSE {result['majority_mse']:.4f})")
        else:
            mcc = f", MCC {result['test_mcc']:.3f}" if "test_mcc" in result else ""
            line = (f"test accuracy {result['test_accuracy']:.3f}, macro-F1 {result['test_macro_f1']:.3f}{mcc} "
                    f"(the majority {'tag' if self.head == 'token' else 'class'}: accuracy "
                    f"{result['majority_accuracy']:.3f}, macro-F1 {result['majority_macro_f1']:.3f})")
        return [f"megacore finetune: step {result['step']}: validation loss {result['valid_loss']:.3f}; "
                f"{line}; {result['tokens_per_second']:,.0f} tokens/s",
                f"megacore finetune: checkpoint {result['checkpoint']}; test predictions in "
                f"{self.output / 'test_predictions.jsonl'}\n"
                f"  predict with it:   megacore predict --checkpoint {checkpoints} --text \"...\"\n"
                f"  evaluate it:       megacore evaluate --checkpoint {checkpoints} --task {self.name}"]


@register_task
class AustenNovelTask(ClassificationTask):
    """Which of Austen's six novels a passage of a few sentences comes from (``megacore.data.austen_novel_examples``:
    whole chapters held out for validation and test)."""

    name = "austen-novel"

    def examples(self, split: str) -> list:
        from megacore.data.classification import austen_novel_examples

        return austen_novel_examples(split)


@register_task
class BiblePairTask(ClassificationTask):
    """Is an English verse the translation of a Spanish one, or a mismatched verse (``megacore.data.
    bible_pair_examples``: sentence pairs, books held out as for translation)."""

    name = "bible-pair"

    def examples(self, split: str) -> list:
        from megacore.data.classification import bible_pair_examples

        return bible_pair_examples(split)


@register_task
class ProperNounTask(ClassificationTask):
    """Tag each word of a passage of the novels as a proper noun (``NAME``) or not (``O``): token classification
    (``megacore.data.proper_noun_examples``)."""

    name = "proper-nouns"
    head = "token"

    def examples(self, split: str) -> list:
        from megacore.data.classification import proper_noun_examples

        return proper_noun_examples(split)


@register_task
class TextClassificationTask(ClassificationTask):
    """Any text (or text-pair) classification or regression on the user's files (``megacore.data.read_labeled``):
    options ``train``, ``valid`` (file paths), ``test`` (default: the validation file), ``text_key`` / ``pair_key``
    / ``label_key`` (default ``text`` / ``text_pair`` / ``label``), ``regression`` (labels are numbers)."""

    name = "classify"
    default_truncation = False
    _OPTIONS = {**ClassificationTask._OPTIONS, "train": str, "valid": str, "test": str, "text_key": str,
                "pair_key": str, "label_key": str, "regression": bool}

    def __init__(self, train: Optional[str] = None, valid: Optional[str] = None, test: Optional[str] = None,
                 text_key: str = "text", pair_key: str = "text_pair", label_key: str = "label",
                 regression: bool = False, **options):
        if train is None or valid is None:
            raise ValueError(f"{_FN}: task classify needs its data: --train FILE and --valid FILE (JSONL, CSV or TSV)")
        if not isinstance(regression, bool):
            raise ValueError(f"{_FN}: task option regression={regression!r} must be true or false")
        self.files = {"train": train, "valid": valid, "test": test or valid}
        self.keys = {"text_key": text_key, "pair_key": pair_key, "label_key": label_key}
        self.regression = regression
        super().__init__(**options)
        self._read: dict[str, list] = {}

    def examples(self, split: str) -> list:
        from megacore.data.classification import read_labeled

        if split not in self._read:
            self._read[split] = read_labeled(self.files[split], **self.keys)
        return self._read[split]


# ---- a fine-tuned checkpoint: megacore evaluate --task, megacore predict -------------------------------------


def is_finetuned(checkpoint: str) -> bool:
    """Whether ``checkpoint`` holds a fine-tuned classifier (a ``megacore finetune`` run of a classification
    task); False for anything else, including a path that is not a checkpoint (the caller's own error says so)."""
    from megacore.training.checkpoint import resolve_checkpoint
    from megacore.training.resume import _read_extra

    try:
        return _read_extra(resolve_checkpoint(checkpoint, "evaluate"), "evaluate").get("model_class") == "classifier"
    except (ValueError, OSError):
        return False


def _task_of_checkpoint(model, extra: dict, name: Optional[str], fn: str) -> ClassificationTask:
    """The classification task ``name`` (default: the one the checkpoint was fine-tuned on) with the run's options,
    its labels the model's."""
    from megacore.data.classification import LabelSet
    from megacore.models.classification import Classifier
    from megacore.training.tasks import TASKS

    if not isinstance(model, Classifier):
        raise ValueError(f"{fn}: {extra['path']} is not a fine-tuned classifier (a {type(model).__name__}: "
                         "fine-tune it with megacore finetune TASK first)")
    saved = extra.get("train_config") or {}
    name = name or saved.get("task")
    if name not in TASKS or not issubclass(TASKS[name], ClassificationTask):
        known = sorted(n for n, cls in TASKS.items() if issubclass(cls, ClassificationTask))
        raise ValueError(f"{fn}: --task {name!r} is not a classification task; known: {', '.join(known)}")
    cls = TASKS[name]
    options = dict(saved.get("task_options") or {}) if saved.get("task") == name else {}
    if cls is TextClassificationTask and name != saved.get("task"):
        raise ValueError(f"{fn}: --task classify needs the run's files: evaluate a classify checkpoint, or give --file")
    task = cls.from_options(options, model)
    if task.head != model.config.head or task.regression != (model.config.problem_type == "regression"):
        raise ValueError(f"{fn}: task {name!r} needs a {task.head} {'regression' if task.regression else 'classification'}"
                         f" head; the checkpoint has a {model.config.head} head ({model.config.problem_type})")
    regression = model.config.problem_type == "regression"
    task.labels = LabelSet([] if regression else list(model.config.label_names) or
                           [f"LABEL_{i}" for i in range(model.config.num_labels)], regression=regression)
    task.zero_token_types = model.config.type_vocab_size < 2
    task.tokenizer_, task.seq_len = None, int(saved.get("seq_len", 128))
    return task


def evaluate_finetuned(checkpoint: str, task: Optional[str] = None, split: str = "test",
                       file: Optional[str] = None) -> dict:
    """``megacore evaluate --checkpoint DIR [--task TASK] [--split valid|test] [--file FILE]``: a fine-tuned
    classifier's metrics (:meth:`ClassificationTask.scores`, with ``loss`` and ``examples``) on a held-out split of
    its task, or on a file of the same format as ``classify``'s (the run's field names). A label the model was not
    trained on is an error naming the example. Returns the metrics with ``"checkpoint"`` and ``"task"``."""
    from megacore.training.resume import model_from_checkpoint

    fn = "megacore evaluate"
    if split not in ("valid", "test"):
        raise ValueError(f"{fn}: --split {split!r} must be valid or test")
    model, tokenizer, extra = model_from_checkpoint(checkpoint)
    the_task = _task_of_checkpoint(model, extra, task, fn)
    the_task.tokenizer_ = tokenizer
    if file is not None:
        from megacore.data.classification import read_labeled

        keys = getattr(the_task, "keys", {})
        examples = read_labeled(file, **keys)
    else:
        examples = the_task.examples(split)
    examples = the_task._first(examples, the_task.test_samples)
    result = the_task.predict(model, the_task._encode(examples, split))
    return {"task": the_task.name, "split": "file" if file else split, "examples": len(examples),
            "loss": result["loss"], **the_task.scores(result), "checkpoint": extra["path"]}


@torch.no_grad()
def predict_text(model, tokenizer, extra: dict, text: str, text_pair: Optional[str] = None, top: int = 1) -> list[str]:
    """``megacore predict``: the lines to print for ``text`` (and ``text_pair``) through a fine-tuned classifier:
    ``label<TAB>probability`` for the ``top`` most probable labels; a regression model's number; a tagging model's
    words as ``word<TAB>tag<TAB>probability``. Every rank of a tensor-parallel model computes the same."""
    from megacore.data.classification import LabeledExample

    fn = "megacore predict"
    the_task = _task_of_checkpoint(model, extra, None, fn)
    the_task.tokenizer_ = tokenizer
    if not text.strip():
        raise ValueError(f"{fn}: --text is empty")
    if text_pair is not None and not text_pair.strip():
        raise ValueError(f"{fn}: --text-pair is empty")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{fn}: --top {top!r} must be an int >= 1")
    names = the_task.labels.names
    # The example's label is a placeholder the encoding requires; only the model's prediction is read.
    if the_task.head == "token":
        words = tuple(text.split())
        example = LabeledExample(text=text, label=(names[0],) * len(words), words=words, where="--text")
    else:
        example = LabeledExample(text=text, text_pair=text_pair, label=0.0 if the_task.regression else names[0],
                                 where="--text")
    dataset = the_task._encode([example], "--text")
    if dataset.truncated:
        raise ValueError(f"{fn}: the text is longer than the model's --seq-len {the_task.seq_len} tokens")
    inner = getattr(model, "module", model)
    batch = to_device(the_task.batch(torch.utils.data.default_collate([dataset[0]])), next(inner.parameters()).device)
    batch.pop("labels")
    logits = inner(**batch).logits.float()[0]
    if the_task.regression:
        return [f"{float(logits[0]):.6g}"]
    probs = logits.softmax(-1)
    if the_task.head == "token":
        first = dataset[0]["labels"] != -100  # the first piece of each word
        rows = probs[: first.shape[0]][torch.as_tensor(first)[: probs.shape[0]]]
        return [f"{word}\t{names[int(p.argmax())]}\t{float(p.max()):.4f}" for word, p in zip(words, rows)]
    values, indices = probs.topk(min(top, len(names)))
    return [f"{names[int(i)]}\t{float(v):.4f}" for v, i in zip(values, indices)]


__all__ = ["AustenNovelTask", "BiblePairTask", "ClassificationTask", "ProperNounTask", "ShuffledEpochs",
           "TextClassificationTask", "evaluate_finetuned", "is_finetuned", "predict_text", "trim_batch"]
