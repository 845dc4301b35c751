"""Whole-model benchmark (megacore presets vs the Hugging Face models of the same configuration, eager and
torch.compile); see megacore/benchmarks/model.py.

    python benchmarks/model.py [--models gpt-tiny bert-tiny] [--dtypes float32 bfloat16] [--quick] [--no-compile]
"""

from megacore.benchmarks.model import main

if __name__ == "__main__":
    raise SystemExit(main())
