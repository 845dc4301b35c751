"""Generation benchmark (greedy decoding with a KV cache: prefill and decode tokens/s of megacore's generate vs
transformers' GPT2LMHeadModel.generate on the same weights, eager and torch.compile); see
megacore/benchmarks/generate.py.

    python benchmarks/generate.py [--model gpt2-small] [--batch-sizes 1 8] [--prompt-len 128] [--new-tokens 128]
                                  [--dtype float32] [--quick] [--no-compile] [--json PATH]
"""

from megacore.benchmarks.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
