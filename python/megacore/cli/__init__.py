"""The `megacore` command."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import megacore

    print(json.dumps(megacore.build_info(), indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from megacore.benchmarks import main as bench_main

    return bench_main([args.name, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megacore",
        description="megacore: Megatron-LM-style transformer training with a C++/CUDA core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="print what this build contains (CPU ISAs, CUDA, torch, compiler)")
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser(
        "bench",
        help="run a side-by-side benchmark (ops: fused ops; layer: the transformer layer; model: whole models vs Hugging Face)",
        description="Run a benchmark; options after NAME go to it (e.g. `megacore bench ops --help`).",
    )
    bench.add_argument("name", choices=["ops", "layer", "model"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
