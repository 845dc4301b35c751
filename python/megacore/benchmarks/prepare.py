"""`megacore prepare` benchmark: tokens/s of the whole pipeline (read, decode, tokenize, write .bin/.idx) on the
embedded corpus and on it replicated 10x, with 1 and 2 workers, side by side with a plain `tokenizers`
``encode_batch`` loop over the same documents (the tokenizer alone: the ceiling for one process).

    python -m megacore.benchmarks prepare [--replicate 10] [--workers 1 2] [--vocab-size 8192] [--quick]
    megacore bench prepare ...        (the same)
    python benchmarks/prepare.py ...  (the same)

One document per novel file (``--document-unit`` changes it). The tokenizer is a byte-level BPE trained once on
the training split before timing (or ``--tokenizer PATH``). A second table (index building: C++ vs the
pure-Python reference, 10 M samples) comes from :func:`index_building_rows`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

HEADER = ("| corpus | documents | tokens | workers | prepare tokens/s | `encode_batch` tokens/s | prepare / encode_batch |\n"
          "|---|---|---|---|---|---|---|")


def index_building_rows(num_samples: int, quick: bool = False) -> list[str]:
    """The GPT sample index for ``num_samples`` samples (seq_len 1024, 200 k documents of 10-2000 tokens,
    shuffled per epoch, as many epochs as needed) and the blending indices of 3 datasets for as many samples,
    each built by ``megacore._C`` (C++) and by ``megacore.data.index_reference`` (pure Python), the results
    checked equal. Prints its header; returns the markdown rows."""
    import numpy as np

    from megacore import _C
    from megacore.data import index_reference

    rng = np.random.default_rng(0)
    seq_length, docs = (128, 2_000) if quick else (1024, 200_000)
    sizes = rng.integers(10, 2000, docs).astype(np.int32)
    tokens_per_epoch = int(sizes.sum())
    epochs = -(-num_samples * seq_length // tokens_per_epoch)  # ceil: enough epochs for num_samples
    document_index = np.concatenate([rng.permutation(docs) for _ in range(epochs)]).astype(np.int32)
    args = (sizes, document_index, seq_length, epochs, tokens_per_epoch)
    weights = np.array([0.5, 0.3, 0.2])
    rows = []
    print("\n| index | samples | C++ s | Python s | C++ speed-up |\n|---|---|---|---|---|")
    for what, cpp, py in (("GPT sample index", lambda: _C.build_sample_index(*args),
                           lambda: index_reference.build_sample_index(*args)),
                          ("blending indices (3 datasets)", lambda: _C.build_blending_indices(weights, num_samples),
                           lambda: index_reference.build_blending_indices(weights, num_samples))):
        start = time.perf_counter()
        fast = cpp()
        cpp_s = time.perf_counter() - start
        start = time.perf_counter()
        slow = py()
        py_s = time.perf_counter() - start
        for a, b in zip(fast if isinstance(fast, tuple) else (fast,), slow if isinstance(slow, tuple) else (slow,)):
            assert np.array_equal(a, b), f"{what}: C++ and Python disagree"
        count = len(fast) - 1 if what.startswith("GPT") else num_samples
        rows.append(f"| {what} | {count:,} | {cpp_s:.2f} | {py_s:.1f} | {py_s / cpp_s:.0f}x |")
    return rows


def _encode_batch_loop(backend, texts: list[str], chunk_chars: int) -> tuple[int, float]:
    """Tokens and seconds of a plain ``tokenizers.Tokenizer.encode_batch`` over the texts, in batches of about
    ``chunk_chars`` characters (prepare's chunks: one call on all 50 novels is slower, its encodings pile up)."""
    batches, batch, chars = [], [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= chunk_chars:
            batches.append(batch)
            batch, chars = [], 0
    if batch:
        batches.append(batch)
    start = time.perf_counter()
    tokens = 0
    for b in batches:
        tokens += sum(len(e.ids) for e in backend.encode_batch(b))
    return tokens, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    from megacore.benchmarks.ops import describe_machine
    from megacore.data.corpus import corpus_files, read_text
    from megacore.data.prepare import _Reader, PrepareSummary, expand_inputs, prepare_dataset
    from megacore.data.tokenizer import Tokenizer, train_bpe

    parser = argparse.ArgumentParser(prog="megacore bench prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicate", type=int, default=10, help="the larger corpus: the training split this many times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer instead of training one")
    parser.add_argument("--document-unit", default="file", choices=["file", "paragraph", "line"])
    parser.add_argument("--index-samples", type=int, default=10_000_000, help="samples for the index-building table")
    parser.add_argument("--quick", action="store_true", help="persuasion only, replicated 2x, a small vocabulary")
    args = parser.parse_args(argv)

    split = "valid" if args.quick else "train"
    replicate = 2 if args.quick else args.replicate
    vocab = 500 if args.quick else args.vocab_size
    work = Path(tempfile.mkdtemp(prefix="megacore-bench-prepare-"))
    try:
        if args.tokenizer:
            tok = Tokenizer.load(args.tokenizer)
        else:
            tok = train_bpe(corpus_files(split), vocab_size=vocab)
        base = corpus_files(split)
        replicated = []
        for r in range(replicate):  # plain .txt copies: the same text, 10x the documents and bytes
            for p in base:
                replicated.append(work / "x" / f"{r:03d}_{p.name.removesuffix('.xz')}")
                replicated[-1].parent.mkdir(exist_ok=True)
                replicated[-1].write_text(read_text(p), encoding="utf-8")
        corpora = [("austen " + split, base), (f"austen {split} x{replicate}", replicated)]

        print(f"# megacore prepare benchmark — {describe_machine('cpu')}, {os.cpu_count()} CPUs, "
              f"BPE vocab {tok.vocab_size}, one document per {args.document_unit}")
        print(HEADER, flush=True)
        for name, files in corpora:
            texts = [d.text for d in _Reader(expand_inputs(files), fmt="auto", json_key="text",
                                             document_unit=args.document_unit, errors="strict",
                                             summary=PrepareSummary(""), warn=print) if d.text]
            base_tokens, base_seconds = _encode_batch_loop(tok.backend, texts, chunk_chars=1 << 20)
            base_rate = base_tokens / base_seconds
            for w in args.workers:
                s = prepare_dataset(files, work / f"out{w}", tokenizer=tok, workers=w, progress=False,
                            document_unit=args.document_unit, log=lambda m: None)
                rate = s.tokens_per_second
                print(f"| {name} | {s.documents} | {s.tokens:,} | {w} | {rate:,.0f} | {base_rate:,.0f} | "
                      f"{rate / base_rate:.2f}x |", flush=True)
        print("\nprepare: read + decode + tokenize + EOD + write .bin/.idx (the tokenizer trained beforehand). "
              "encode_batch: the `tokenizers` library alone on the same document texts, in one process (its own "
              "thread pool).")
        rows = index_building_rows(args.index_samples, quick=args.quick)
        for row in rows:
            print(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
