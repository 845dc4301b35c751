"""Side-by-side benchmarks shipped with megacore (`python -m megacore.benchmarks NAME`).

Each module has a ``main(argv)``; results for this project's machines are in docs/benchmarks.md.
"""

BENCHMARKS = {"ops": "megacore.benchmarks.ops", "layer": "megacore.benchmarks.layer", "model": "megacore.benchmarks.model",
              "prepare": "megacore.benchmarks.prepare", "train": "megacore.benchmarks.train",
              "pipeline": "megacore.benchmarks.pipeline", "generate": "megacore.benchmarks.generate"}


def main(argv: list[str] | None = None) -> int:
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m megacore.benchmarks {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
