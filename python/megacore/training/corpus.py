"""The embedded corpus, prepared once for ``megacore train``: the five training novels and the held-out one
(*Persuasion*), tokenized with a tokenizer trained on the training novels.

Causal LMs read it with a byte-level BPE, one document per novel; masked LMs (BERT, RoBERTa, ELECTRA) with a
WordPiece tokenizer, cut as ``MASKED_LM_UNITS`` says; T5 (span corruption) reads the novels and both sides of the
embedded Spanish-English Bible (its training books; the validation books next to *Persuasion*) with a bilingual
Unigram tokenizer with sentinels, so that the pretrained model can be fine-tuned for translation. Under torchrun
rank 0 prepares and the others wait.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

_FN = "megacore train"

# How masked-LM pretraining cuts the embedded corpus: one document per paragraph, one sentence per sequence
# (sentence pairs come from within a document, the random ones from another).
MASKED_LM_UNITS = {"document_unit": "paragraph", "split_sentences": True}


def is_main_process() -> bool:
    """Global rank 0 (before torch.distributed is initialized: torchrun's RANK, so that a run's start-up
    logs and writes once too)."""
    return dist.get_rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


def _prepare_embedded_once(root: Path, what: str, train_tokenizer: str, vocab_size: int, log, inputs=None,
                           **units) -> tuple[str, str, str]:
    """(train prefix, valid prefix, tokenizer dir) of the embedded corpus under ``root``, prepared there once
    with a ``train_tokenizer`` tokenizer trained on the training novels (rank 0 prepares; the others wait in
    a barrier that the collective timeout does not bound). ``inputs(split)``: the files of a split (written
    under ``root`` if need be) instead of the novels alone."""
    from megacore.data.prepare import prepare_dataset
    from megacore.parallel.timeouts import barrier

    train, valid = root / "train", root / "valid"
    tokenizer = Path(str(train) + ".tokenizer")
    done = all(Path(str(p) + suffix).exists() for p in (train, valid) for suffix in (".bin", ".idx"))
    if not done and is_main_process():
        log(f"megacore train: preparing the embedded corpus{what} into {root} (once)")
        root.mkdir(parents=True, exist_ok=True)
        prepare_dataset(inputs("train") if inputs else None, train, train_tokenizer=train_tokenizer,
                        vocab_size=vocab_size, split="train", progress=False, log=lambda m: None, **units)
        prepare_dataset(inputs("valid") if inputs else None, valid, tokenizer=tokenizer, split="valid",
                        progress=False, log=lambda m: None, **units)
    barrier(f"{_FN}: preparing the embedded corpus into {root}")
    return str(train), str(valid), str(tokenizer)


def embedded_corpus(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """(train prefix, valid prefix, tokenizer dir) of the embedded corpus with a byte-level BPE, prepared once
    into ``cache_dir`` (rank 0 prepares, the others wait)."""
    return _prepare_embedded_once(Path(cache_dir) / f"austen-bpe{vocab_size}", "", "bpe", vocab_size, log)


def embedded_corpus_wordpiece(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """The embedded corpus for masked-LM pretraining: a WordPiece tokenizer, cut as ``MASKED_LM_UNITS`` says,
    prepared once into ``cache_dir``."""
    return _prepare_embedded_once(Path(cache_dir) / f"austen-wordpiece{vocab_size}-paragraph-sentences",
                                  " (WordPiece, sentences)", "wordpiece", vocab_size, log, **MASKED_LM_UNITS)


def _novels_and_bible(root: Path):
    """``inputs(split)`` for :func:`_prepare_embedded_once`: the split's novels and both sides of the Bible's
    books of that split, written once as text files under ``root`` (a chapter per paragraph, a verse per line)."""
    from megacore._files import atomic_write_text
    from megacore.data import bible_text, corpus_files

    def inputs(split: str) -> list:
        files = list(corpus_files(split))
        for language in ("es", "en"):
            path = root / f"bible-{split}.{language}.txt"
            if not path.exists():
                atomic_write_text(path, bible_text(split, language))
            files.append(path)
        return files

    return inputs


def embedded_corpus_t5(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str, str]:
    """The embedded corpus for T5's span corruption: the novels and both sides of the Bible corpus (training
    books; validation: *Persuasion* and the validation books), a bilingual Unigram tokenizer with 100 sentinels,
    cut as ``MASKED_LM_UNITS`` says, prepared once into ``cache_dir``."""
    root = Path(cache_dir) / f"austen-bible-unigram{vocab_size}-paragraph-sentences"
    return _prepare_embedded_once(root, " and the Bible corpus (bilingual Unigram, sentences)", "unigram",
                                  vocab_size, log, inputs=_novels_and_bible(root), **MASKED_LM_UNITS)


__all__ = ["MASKED_LM_UNITS", "embedded_corpus", "embedded_corpus_t5", "embedded_corpus_wordpiece",
           "is_main_process"]
