"""Whole-model benchmark (megacore presets vs the Hugging Face models of the same configuration, eager and
torch.compile); see megacore/benchmarks/model.py.

    python benchmarks/model.py [--models gpt-tiny bert-tiny t5-tiny t5-small] [--dtypes float32 bfloat16] [--quick]
        [--no-compile] [--source-len 128] [--target-len 32] [--threads N]
"""

from megacore.benchmarks.model import main

if __name__ == "__main__":
    raise SystemExit(main())
