"""Fine-tuning an encoder-decoder (T5) on text pairs: ``megacore finetune translation`` (the embedded Spanish-English
Bible corpus, whole books held out) and ``megacore finetune seq2seq`` (the user's JSONL / TSV pairs), as tasks of
the one training loop (``tasks.py``): the same progress bar, metrics, checkpoints and resume as pretraining.

A run starts from a ``megacore train`` checkpoint (``TrainConfig.pretrained``: its model, weights and tokenizer) or
from scratch (a preset; a bilingual Unigram tokenizer is trained on both sides of the training pairs and kept in
the run directory). Samples are whole pairs: the source (after the task's prefix, e.g. T5's ``"translate Spanish
to English: "``) and the target, each ending with ``</s>``, cut to ``--seq-len`` / ``target_length`` tokens; a
batch is trimmed to its longest row (rounded up to 16), so short texts cost what they hold.

Validation (every ``--eval-interval`` steps and at the end): the teacher-forced loss and token accuracy, and BLEU /
chrF (sacrebleu, its default 13a tokenization) of greedy decoding on the validation pairs. At the end, on the test
pairs: BLEU and chrF of greedy decoding and of beam search (``beams``, ``length_penalty``), next to the
copy-the-source baseline (the source itself as the translation) for translation, and ROUGE-1/2/L F1 (rouge-score,
stemmed) for seq2seq; the test predictions are written to ``test_predictions.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar, Optional

import torch

from megacore.training.tasks import _FN, EncoderDecoderTask, TaskData, register_task, training_stream

_NAME = "megacore.training.seq2seq"
LANGUAGE_NAMES = {"es": "Spanish", "en": "English"}
DIRECTIONS = ("es-en", "en-es")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


# ---- metrics ----------------------------------------------------------------------------------------------------


def text_metrics(hypotheses: list[str], references: list[str], rouge: bool = False) -> dict:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenization, chrF with character 6-grams, beta 2), and with
    ``rouge`` the mean ROUGE-1/2/L F1 (rouge-score, Porter-stemmed), all on a 0-100 scale:
    ``{"bleu", "chrf"[, "rouge1", "rouge2", "rougeL"]}``. Raises ValueError when the lists differ in length or are
    empty; ImportError naming the package when sacrebleu / rouge-score is missing."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{_NAME}.text_metrics: {len(hypotheses)} hypotheses for {len(references)} references "
                         "(need as many, at least one)")
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(f"{_NAME}: BLEU and chrF need sacrebleu: pip install sacrebleu") from e
    out = {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
           "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}
    if rouge:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise ImportError(f"{_NAME}: ROUGE needs rouge-score: pip install rouge-score") from e
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for hyp, ref in zip(hypotheses, references):
            for key, score in scorer.score(ref, hyp).items():
                totals[key] += score.fmeasure
        out.update({key: 100.0 * value / len(hypotheses) for key, value in totals.items()})
    return out


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], *, batch_size: int = 32, max_new_tokens: int = 128,
              num_beams: int = 1, length_penalty: float = 1.0, source_length: Optional[int] = None) -> list[str]:
    """The decoded outputs of an encoder-decoder for ``sources`` (texts, each ended with ``</s>`` and cut to
    ``source_length`` tokens), greedy or beam search, in batches of similar lengths; in eval mode (restored after).
    Every rank of a tensor-parallel model calls it and gets the same texts."""
    from megacore.training.seq2seq_generate import generate_seq2seq

    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    eos = tokenizer.eod
    encoded = [ids + [eos] for ids in tokenizer.encode_batch(sources)]
    if source_length is not None:
        encoded = [ids if len(ids) <= source_length else ids[:source_length - 1] + [eos] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    was_training = inner.training
    inner.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), tokenizer.pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            generated = generate_seq2seq(inner, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                         num_beams=num_beams, length_penalty=length_penalty, eos_token_id=eos)
            for r, i in enumerate(rows):
                outputs[i] = tokenizer.decode(generated[r], skip_special_tokens=True).strip()
    finally:
        inner.train(was_training)
    return outputs


# ---- the tasks --------------------------------------------------------------------------------------------------


def _is_main() -> bool:
    from megacore.training.corpus import is_main_process

    return is_main_process()


class Seq2SeqFinetuneTask(EncoderDecoderTask):
    """What ``translation`` and ``seq2seq`` share (module docstring). Subclasses say where the pairs come from
    (:meth:`pairs`), the default source prefix and whether ROUGE is reported.

    Options (``TrainConfig.task_options``; ``megacore finetune``'s flags): ``target_length`` (tokens, default 128),
    ``beams`` (the final beam search, default 4), ``length_penalty`` (1.0), ``max_new_tokens`` (default:
    ``target_length``), ``source_prefix`` (text put before every source), ``eval_samples`` (validation pairs decoded at
    each evaluation, default 200; 0: all), ``test_samples`` (test pairs decoded at the end, default 0: all)."""

    metric = "valid_bleu"
    rouge: ClassVar[bool] = False
    default_prefix: ClassVar[str] = ""
    # megacore finetune's defaults for this task (Task.defaults)
    defaults: ClassVar[dict] = {"model": "t5-tiny", "seq_len": 128, "micro_batch_size": 32, "global_batch_size": 32,
                                "train_steps": 3000, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 100,
                                "weight_decay": 0.01, "eval_interval": 1000, "eval_batches": 10,
                                "save_interval": 1000, "log_interval": 50}
    _OPTIONS: ClassVar[dict] = {"target_length": int, "beams": int, "length_penalty": float, "max_new_tokens": int,
                                "source_prefix": str, "eval_samples": int, "test_samples": int}

    def __init__(self, target_length: int = 128, beams: int = 4, length_penalty: float = 1.0,
                 max_new_tokens: Optional[int] = None, source_prefix: Optional[str] = None, eval_samples: int = 200,
                 test_samples: int = 0):
        checks = (("target_length", target_length, 2), ("beams", beams, 1), ("eval_samples", eval_samples, 0),
                  ("test_samples", test_samples, 0))
        for name, value, least in checks + ((("max_new_tokens", max_new_tokens, 1),) if max_new_tokens else ()):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{_FN}: task option {name}={value!r} must be an int >= {least}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
            raise ValueError(f"{_FN}: task option length_penalty={length_penalty!r} must be a number")
        self.target_length, self.beams, self.length_penalty = target_length, beams, float(length_penalty)
        self.max_new_tokens = max_new_tokens or target_length
        self.source_prefix = self.default_prefix if source_prefix is None else source_prefix
        self.eval_samples, self.test_samples = eval_samples, test_samples

    @classmethod
    def accepts(cls, model: torch.nn.Module) -> bool:
        """an encoder-decoder: a T5 preset or checkpoint"""
        from megacore.models.t5 import T5Model

        return isinstance(model, T5Model)

    @classmethod
    def source_prefix_of(cls, options: dict) -> str:
        """The source prefix a run with these task options put before every source (``megacore generate`` puts it
        before the prompt)."""
        options = {k: v for k, v in options.items() if k not in ("train", "valid", "test")}
        return cls(**options, **({"train": "", "valid": ""} if cls is Seq2SeqTask else {})).source_prefix

    # -- data

    def pairs(self, split: str) -> list:
        """The ``TextPair`` list of ``split`` ("train", "valid" or "test")."""
        raise NotImplementedError

    def _tokenizer(self, config, train_pairs, log):
        """(tokenizer, its directory): the pretrained checkpoint's, else the run's own (``<output>/tokenizer``),
        trained on both sides of the training pairs the first time."""
        from megacore.data import Tokenizer, train_unigram
        from megacore.training.checkpoint import resolve_checkpoint
        from megacore.training.resume import _read_extra

        if config.pretrained is not None:
            path = _read_extra(resolve_checkpoint(config.pretrained, "finetune"), "finetune")["tokenizer"]
            tokenizer = Tokenizer.load(path)
            if not tokenizer.eod or tokenizer.pad is None:
                raise ValueError(f"{_FN}: the pretrained checkpoint's tokenizer has no </s> or padding token")
            return tokenizer, os.path.abspath(path)
        from megacore.parallel.timeouts import barrier

        path = Path(config.output) / "tokenizer"
        if not path.exists() and _is_main():
            log(f"megacore finetune: training a Unigram tokenizer (vocab {config.vocab_size}) on both sides of the "
                f"{len(train_pairs):,} training pairs into {path}")
            texts = [p.source for p in train_pairs] + [p.target for p in train_pairs]
            tokenizer = train_unigram(["\n".join(texts)], vocab_size=config.vocab_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=path.parent))
            try:
                tokenizer.save(staging)
                os.replace(staging, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        barrier(f"{_FN}: training the tokenizer into {path}")
        return Tokenizer.load(path), str(path.resolve())

    def datasets(self, config, data_parallel_size: int, segments: list[int], log) -> TaskData:
        from megacore.data import Seq2SeqDataset, tokenize_pairs

        if config.pipeline_parallel_size > 1:
            raise ValueError(f"{_FN}: task {self.name!r} decodes for BLEU, which pipeline stages cannot do yet: "
                             "use --pipeline-parallel-size 1 (tensor and data parallelism work)")
        train_pairs, valid_pairs = self.pairs("train"), self.pairs("valid")
        tokenizer, tok_path = self._tokenizer(config, train_pairs, log)
        self.tokenizer, self.source_length = tokenizer, config.seq_len
        self.valid_pairs, self.output = valid_pairs, Path(config.output)
        train_ids = tokenize_pairs(train_pairs, tokenizer, self.source_prefix)

        def make(num_samples: int, seed: int):
            return Seq2SeqDataset(train_ids, config.seq_len, self.target_length, tokenizer.pad, num_samples, seed)

        train = training_stream(make, segments, config.seed)
        valid = Seq2SeqDataset(tokenize_pairs(valid_pairs, tokenizer, self.source_prefix), config.seq_len,
                               self.target_length, tokenizer.pad)
        cut = make(len(train_ids), 0).truncated
        if cut:
            log(f"megacore finetune: {cut} of {len(train_ids):,} training pairs are longer than --seq-len "
                f"{config.seq_len} / target_length {self.target_length} tokens and are cut")
        return TaskData(train, valid, tokenizer, tok_path, None)

    def batch(self, item: dict) -> dict:
        """The collated pairs trimmed to the batch's longest source and target (rounded up to 16)."""
        batch = super().batch(item)

        def width(used: torch.Tensor) -> int:
            n = int(used.any(0).nonzero().max()) + 1 if used.any() else 1
            return min(-(-n // 16) * 16, used.shape[1])

        s = width(batch["attention_mask"] != 0)
        t = width(batch["labels"] != -100)
        return {"input_ids": batch["input_ids"][:, :s], "attention_mask": batch["attention_mask"][:, :s],
                "labels": batch["labels"][:, :t]}

    # -- evaluation

    def _decode(self, model, pairs, num_beams: int) -> list[str]:
        return translate(model, self.tokenizer, [self.source_prefix + p.source for p in pairs],
                         max_new_tokens=self.max_new_tokens, num_beams=num_beams, length_penalty=self.length_penalty,
                         source_length=self.source_length)

    def evaluate(self, model: torch.nn.Module, dataset, micro_batch_size: int, batches: int) -> dict:
        """The teacher-forced ``valid_loss`` / ``target_accuracy``, and ``valid_bleu`` / ``valid_chrf`` of greedy
        decoding on the first ``eval_samples`` validation pairs."""
        record = super().evaluate(model, dataset, micro_batch_size, batches)
        pairs = self.valid_pairs[:self.eval_samples] if self.eval_samples else self.valid_pairs
        scores = text_metrics(self._decode(model, pairs, 1), [p.target for p in pairs])
        return {**record, "valid_bleu": scores["bleu"], "valid_chrf": scores["chrf"]}

    def final_evaluation(self, model: torch.nn.Module, data: TaskData, config) -> dict:
        """On the test pairs: BLEU / chrF (and ROUGE) of greedy decoding and of beam search, and for translation
        the copy-the-source baseline's; the predictions go to ``test_predictions.jsonl`` (rank 0)."""
        from megacore._files import atomic_write_text

        pairs = self.pairs("test")
        pairs = pairs[:self.test_samples] if self.test_samples else pairs
        references = [p.target for p in pairs]
        greedy = self._decode(model, pairs, 1)
        out = {"test_pairs": len(pairs)}
        out.update({f"test_{k}": v for k, v in text_metrics(greedy, references, self.rouge).items()})
        beam = greedy
        if self.beams > 1:
            beam = self._decode(model, pairs, self.beams)
            out.update({f"test_beam{self.beams}_{k}": v
                        for k, v in text_metrics(beam, references, self.rouge).items()})
        if self.copy_baseline:
            out.update({f"copy_{k}": v for k, v in text_metrics([p.source for p in pairs], references).items()})
        if _is_main():
            lines = [json.dumps({"source": p.source, "reference": p.target, "greedy": g, "beam": b},
                                ensure_ascii=False) for p, g, b in zip(pairs, greedy, beam)]
            atomic_write_text(self.output / "test_predictions.jsonl", "\n".join(lines) + "\n")
        return out

    copy_baseline: ClassVar[bool] = False

    def evaluation_dataset(self, prefix: str, tokenizer, seq_len: int, num_samples: int):
        raise ValueError(f"megacore evaluate: a {self.name} checkpoint is evaluated by its fine-tuning run's final "
                         "test metrics (metrics.jsonl)")

    def report(self, result: dict, checkpoints: Path) -> list[str]:
        beams = f"beam{self.beams}_" if self.beams > 1 else ""
        line = (f"megacore finetune: step {result['step']}: validation loss {result['valid_loss']:.3f}, BLEU "
                f"{result['valid_bleu']:.2f}; test ({result['test_pairs']} pairs): BLEU {result['test_bleu']:.2f} "
                f"greedy")
        if beams:
            line += f", {result[f'test_{beams}bleu']:.2f} with {self.beams} beams"
        line += f", chrF {result[f'test_{beams}chrf']:.1f}"
        if self.copy_baseline:
            line += f" (copying the source: BLEU {result['copy_bleu']:.2f}, chrF {result['copy_chrf']:.1f})"
        if self.rouge:
            line += (f", ROUGE-1/2/L {result[f'test_{beams}rouge1']:.1f} / {result[f'test_{beams}rouge2']:.1f} / "
                     f"{result[f'test_{beams}rougeL']:.1f}")
        return [line + f"; {result['tokens_per_second']:,.0f} tokens/s",
                f"megacore finetune: checkpoint {result['checkpoint']}; test predictions in "
                f"{self.output / 'test_predictions.jsonl'}\n"
                f"  translate with it:  megacore generate --checkpoint {checkpoints} --prompt \"...\" --beams "
                f"{self.beams}"]


@register_task
class TranslationTask(Seq2SeqFinetuneTask):
    """Translation on the embedded Spanish-English Bible corpus (``megacore.data.bible_pairs``): train on 61 books,
    validate on Ruth, Jonah and Philemon, test on Mark and Esther. Option ``direction``: ``"es-en"`` (default) or
    ``"en-es"``; the source prefix is T5's ``"translate Spanish to English: "`` style."""

    name = "translation"
    copy_baseline = True
    _OPTIONS = {**Seq2SeqFinetuneTask._OPTIONS, "direction": str}

    def __init__(self, direction: str = "es-en", **options):
        if direction not in DIRECTIONS:
            raise ValueError(f"{_FN}: task option direction={direction!r} must be one of {', '.join(DIRECTIONS)}")
        self.direction = direction
        self.source_language, self.target_language = direction.split("-")
        self.default_prefix = (f"translate {LANGUAGE_NAMES[self.source_language]} to "
                               f"{LANGUAGE_NAMES[self.target_language]}: ")
        super().__init__(**options)

    def pairs(self, split: str) -> list:
        from megacore.data import TextPair, bible_pairs

        return [TextPair(getattr(p, self.source_language), getattr(p, self.target_language),
                         f"{p.book} {p.chapter}:{p.verse}") for p in bible_pairs(split)]


@register_task
class Seq2SeqTask(Seq2SeqFinetuneTask):
    """Any text-to-text task on the user's files (``megacore.data.read_pairs``): options ``train``, ``valid`` (file
    paths), ``test`` (default: the validation file), ``source_key`` / ``target_key`` (default ``source`` /
    ``target``). Reports ROUGE next to BLEU and chrF."""

    name = "seq2seq"
    rouge = True
    _OPTIONS = {**Seq2SeqFinetuneTask._OPTIONS, "train": str, "valid": str, "test": str, "source_key": str,
                "target_key": str}

    def __init__(self, train: Optional[str] = None, valid: Optional[str] = None, test: Optional[str] = None,
                 source_key: str = "source", target_key: str = "target", **options):
        if train is None or valid is None:
            raise ValueError(f"{_FN}: task seq2seq needs its data: --train FILE and --valid FILE (JSONL or TSV)")
        self.files = {"train": train, "valid": valid, "test": test or valid}
        self.source_key, self.target_key = source_key, target_key
        super().__init__(**options)

    def pairs(self, split: str) -> list:
        from megacore.data import read_pairs

        return read_pairs(self.files[split], self.source_key, self.target_key)


__all__ = ["DIRECTIONS", "Seq2SeqFinetuneTask", "Seq2SeqTask", "TranslationTask", "text_metrics", "translate"]
