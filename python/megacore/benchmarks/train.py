"""Training-step benchmark: forward + backward + AdamW of megacore's GPT against transformers'
``GPT2LMHeadModel`` with the same configuration, eager and under ``torch.compile``, in one run.

Reports tokens/s and model FLOP/s as a fraction of this machine's GEMM FLOP/s measured in the same run
(a square fp32/bf16 matmul), i.e. the MFU on this machine. Model FLOPs per token (Megatron / Kaplan):
``6 * (layer parameters + vocab * hidden) + 12 * layers * hidden * seq`` (the LM head's GEMM counted,
the embedding lookup not).

    python -m megacore.benchmarks train [--dtypes float32 bfloat16] [--quick] [--no-compile]
    megacore bench train ...          (the same)
    python benchmarks/train.py ...    (the same)

Default configuration (the issue's): 4 layers x 256 hidden x 4 heads, seq 256, batch 8, vocab 8192.
"""

from __future__ import annotations

import argparse
import time

import torch

from megacore.benchmarks.ops import DTYPES, _time, describe_machine
from megacore.models import GPTModel, ModelConfig

CONFIG = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4, max_position_embeddings=256,
              activation="gelu_tanh")
SHAPE, QUICK_SHAPE = (8, 256), (2, 64)


def gemm_flops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """This machine's matmul FLOP/s for ``dtype`` (an n x n by n x n product, best of ``reps``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(config: ModelConfig, seq: int) -> float:
    h, layers = config.hidden_size, config.num_layers
    layer_params = layers * (4 * h * h + 2 * h * config.ffn_hidden_size)
    return 6 * (layer_params + config.vocab_size * h) + 12 * layers * h * seq


def _hf_model(config: ModelConfig, dtype: torch.dtype):
    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
        activation_function="gelu_new", resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.norm_epsilon))
    return hf.to(dtype).train()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW as a user writes it: fused where torch has it for these parameters, else foreach."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def _steps(dtype: torch.dtype, batch: int, seq: int, compile_: bool) -> tuple[dict, ModelConfig]:
    torch.manual_seed(0)
    config = ModelConfig(**CONFIG, params_dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    ours, hf = GPTModel(config).train(), _hf_model(config, dtype)

    def step(model, loss_fn):
        opt = _optimizer(model)

        def run():
            loss_fn(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def mine(model):
        return model(ids, labels=labels).sum() / (labels != -100).sum()

    def theirs(model):  # HF shifts the labels itself
        return model(input_ids=ids, labels=ids).loss

    fns = {"megacore": step(ours, mine), "hf": step(hf, theirs)}
    if compile_:
        torch._dynamo.reset()
        ours_c, hf_c = torch.compile(ours), torch.compile(hf)
        fns["megacore_compile"] = step(ours, lambda m: mine(ours_c))
        fns["hf_compile"] = step(hf, lambda m: theirs(hf_c))
    return fns, config


HEADER = ("| dtype | batch x seq | megacore tok/s | HF tok/s | megacore compile tok/s | HF compile tok/s | "
          "megacore MFU | vs HF | vs HF compile |\n|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="a tiny batch, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("the training benchmark compares with Hugging Face: pip install transformers")
    print(f"# megacore training-step benchmark (forward + backward + AdamW) — {describe_machine('cpu')}")
    print(HEADER, flush=True)
    batch, seq = QUICK_SHAPE if args.quick else SHAPE
    for name in args.dtypes:
        dtype = DTYPES[name]
        fns, config = _steps(dtype, batch, seq, not args.no_compile)
        times = _time(fns, args.reps, min_time=1.0)
        peak = gemm_flops(dtype)
        tokens = batch * seq
        tps = {k: tokens / v for k, v in times.items()}
        mfu = tps["megacore"] * flops_per_token(config, seq) / peak
        compiled = (f"{tps['megacore_compile']:,.0f} | {tps['hf_compile']:,.0f}" if "hf_compile" in tps else "- | -")
        vs_compile = (f"{times['hf_compile'] / min(times['megacore'], times['megacore_compile']):.2f}x"
                      if "hf_compile" in times else "-")
        print(f"| {name} | {batch} x {seq} | {tps['megacore']:,.0f} | {tps['hf']:,.0f} | {compiled} | "
              f"{100 * mfu:.0f}% of {peak / 1e9:.0f} GFLOP/s | {times['hf'] / times['megacore']:.2f}x | {vs_compile} |",
              flush=True)
    print("\nvs HF: HF eager / megacore eager. vs HF compile: HF compiled / megacore's faster variant (a user "
          "runs whichever is faster). MFU: megacore eager's model FLOP/s over the GEMM FLOP/s measured here.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
