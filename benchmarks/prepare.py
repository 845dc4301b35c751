"""`megacore prepare` benchmark (tokens/s with 1 and 2 workers vs a plain `tokenizers` encode_batch loop, on the
embedded corpus and on it replicated 10x); see megacore/benchmarks/prepare.py.

    python benchmarks/prepare.py [--replicate 10] [--workers 1 2] [--vocab-size 8192] [--quick]
"""

from megacore.benchmarks.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
