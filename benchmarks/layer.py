"""Transformer-layer benchmark (megacore C++ layer vs the Python reference vs an eager PyTorch block vs
torch.compile of it); see megacore/benchmarks/layer.py.

    python benchmarks/layer.py [--hidden 256 1024] [--dtypes float32 bfloat16] [--quick] [--no-compile]
"""

from megacore.benchmarks.layer import main

if __name__ == "__main__":
    raise SystemExit(main())
