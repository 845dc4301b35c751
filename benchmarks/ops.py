"""Fused-op benchmark (megacore vs PyTorch eager vs torch.compile); see megacore/benchmarks/ops.py.

    python benchmarks/ops.py [--dtypes float32 bfloat16] [--ops NAME ...] [--quick] [--no-compile]
"""

from megacore.benchmarks.ops import main

if __name__ == "__main__":
    raise SystemExit(main())
