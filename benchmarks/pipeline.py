"""Pipeline-parallel benchmark (step time, measured vs theoretical bubble, per-rank activation and optimizer-state
memory at PP 1, 2, 4, interleaved PP 2 x V 2 and PP 2 x DP 2 with and without the distributed optimizer, each layout
as real gloo processes); see megacore/benchmarks/pipeline.py.

    python benchmarks/pipeline.py [--layouts pp1 pp2 pp4 pp2v2 pp2dp2 pp2dp2+distopt] [--quick] [--json PATH]
"""

from megacore.benchmarks.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
