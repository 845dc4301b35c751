"""The `megacore` command."""

from __future__ import annotations

import argparse
import json
import sys

from megacore.benchmarks import BENCHMARKS  # names only: each benchmark is imported when it runs


def _cmd_info(args: argparse.Namespace) -> int:
    import megacore
    from megacore._machine import machine_info

    print(json.dumps({**megacore.build_info(), "machine": machine_info()}, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from megacore.benchmarks import main as bench_main

    return bench_main([args.name, *args.rest])


def _cmd_prepare(args: argparse.Namespace) -> int:
    from megacore.cli.errors import print_error
    from megacore.data.prepare import PrepareError, merge_datasets, prepare_dataset

    try:
        if args.merge:
            if args.inputs:
                raise PrepareError("megacore prepare --merge: takes the datasets after --merge, not as inputs")
            summary = merge_datasets(args.merge, args.output)
        else:
            summary = prepare_dataset(
                args.inputs, args.output, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                vocab_size=args.vocab_size, split=args.split, fmt=args.format, json_key=args.json_key,
                document_unit=args.document_unit, workers=args.workers, append_eod=not args.no_eod,
                split_sentences=args.split_sentences, errors=args.errors, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # bad input: the message says what and where; no traceback
        return print_error(e)
    print(summary.line())
    return 0


def _add_prepare(sub) -> None:
    from megacore.data.prepare import DOCUMENT_UNITS, ERRORS, FORMATS, TOKENIZER_KINDS

    p = sub.add_parser(
        "prepare",
        help="tokenize text / JSONL into a Megatron-compatible indexed dataset (PREFIX.bin + PREFIX.idx)",
        description="Tokenize text files, directories of them, or JSONL into PREFIX.bin + PREFIX.idx (Megatron-LM's "
                    "MMap indexed format) and save the tokenizer to PREFIX.tokenizer/. With no inputs: the "
                    "embedded Austen corpus. With --merge: concatenate prepared datasets.",
    )
    p.add_argument("inputs", nargs="*", help="text files (.txt, .txt.xz), directories (searched recursively) or "
                                              "JSONL files (.jsonl, .json); none: the embedded corpus")
    p.add_argument("--output", "-o", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx, PREFIX.tokenizer/ (an existing dataset there is replaced only "
                        "once the new one is complete)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", help="a saved megacore tokenizer (directory or tokenizer.json)")
    tok.add_argument("--train-tokenizer", choices=TOKENIZER_KINDS,
                     help="train one on the inputs (the default, bpe, when --tokenizer is not given)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of a trained tokenizer (default 8192)")
    p.add_argument("--split", default="train", choices=["train", "valid", "all"],
                   help="with no inputs: which part of the embedded corpus (valid = persuasion)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="auto: JSONL by suffix (.jsonl, .json), else text")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--document-unit", default="file", choices=DOCUMENT_UNITS,
                   help="text files: one document per file (default), paragraph or line")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--no-eod", action="store_true", help="do not end each document with the EOD token")
    p.add_argument("--split-sentences", action="store_true", help="each sentence its own sequence")
    p.add_argument("--errors", default="strict", choices=ERRORS,
                   help="undecodable bytes and bad JSONL lines: stop (strict, default), replace bytes with "
                        "U+FFFD, or skip the document; each is reported and counted")
    p.add_argument("--merge", nargs="+", metavar="PREFIX", help="merge these prepared datasets into --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacore",
        description="megacore: Megatron-LM-style transformer training with a C++/CUDA core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print what this build contains (CPU ISAs, CUDA, torch, compiler) and what this "
                                      "machine computes natively (bf16, and so what --dtype auto chooses)")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser(
        "bench",
        help="run a side-by-side benchmark (ops: fused ops; layer: the transformer layer; model: whole models vs "
             "Hugging Face; prepare: `megacore prepare` vs plain tokenizers; train: a training step vs Hugging Face; "
             "pipeline: pipeline-parallel layouts' step time, bubble and memory; generate: greedy decoding's "
             "prefill and decode tokens/s vs Hugging Face)",
        description="Run a benchmark; options after NAME go to it (e.g. `megacore bench ops --help`).",
    )
    bench.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(func=_cmd_bench)
    _add_prepare(sub)
    from megacore.cli.training import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    code = args.func(args)
    # A torchrun worker whose command succeeded leaves torch.distributed in order (pending collectives, a barrier
    # with the other ranks, the groups destroyed) instead of at interpreter exit, where a gloo group torn down
    # while a peer still talks to it aborts the process (SIGABRT after the run's work is done).
    dist = sys.modules.get("torch.distributed")
    if code == 0 and dist is not None and dist.is_available() and dist.is_initialized():
        from megacore.parallel.state import shutdown_distributed

        shutdown_distributed(barrier=True)
    return code
