"""Training-step benchmark (megacore GPT vs transformers' GPT2LMHeadModel, forward + backward + AdamW, eager and
torch.compile, tokens/s and MFU); see megacore/benchmarks/train.py.

    python benchmarks/train.py [--dtypes float32 bfloat16] [--quick] [--no-compile]
"""

from megacore.benchmarks.train import main

if __name__ == "__main__":
    raise SystemExit(main())
