"""Training-step benchmark: forward + backward + AdamW of megacore's GPT against transformers'
``GPT2LMHeadModel`` with the same configuration, eager and under ``torch.compile``, in one run.

Reports tokens/s and MFU: model FLOP/s as a fraction of the peak. On a GPU whose bf16 dense peak is in
``BF16_PEAK_TFLOPS`` (H100, H200, A100) a bf16 run is measured against that datasheet peak; otherwise, or
with ``--peak-tflops``, against this machine's GEMM FLOP/s measured in the same run (a square matmul).
Model FLOPs per token (Megatron / Kaplan): ``6 * (layer parameters + vocab * hidden) + 12 * layers * hidden
* seq`` (the LM head's GEMM counted, the embedding lookup not).

    python -m megacore.benchmarks train [--dtypes float32 bfloat16] [--quick] [--no-compile]
    python -m megacore.benchmarks train --model gpt-1.3b --batch 4 --seq 2048 --dtypes bfloat16 --no-hf
    megacore bench train ...          (the same)
    python benchmarks/train.py ...    (the same)

Default configuration (the issue's): 4 layers x 256 hidden x 4 heads, seq 256, batch 8, vocab 8192;
``--model PRESET`` takes a preset of megacore.models instead, ``--override field=value`` changes its fields.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import time
from typing import Callable

import torch

from megacore.benchmarks.ops import DTYPES, _sync, _time, describe_machine
from megacore.models import GPTModel, ModelConfig
from megacore.models.registry import preset_config

CONFIG = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=4, max_position_embeddings=256,
              activation="gelu_tanh")
SHAPE, QUICK_SHAPE = (8, 256), (2, 64)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a substring of the device
# name; the first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200 NVL": 835.0, "H200": 989.0,
                    "A100": 312.0}


def datasheet_peak(device: str, dtype: torch.dtype) -> float | None:
    """The bf16 dense peak FLOP/s of this GPU from ``BF16_PEAK_TFLOPS``; None on CPU, for other dtypes or GPUs."""
    if not device.startswith("cuda") or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def gemm_flops(dtype: torch.dtype, n: int = 1024, reps: int = 10, device: str = "cpu") -> float:
    """This machine's matmul FLOP/s for ``dtype`` (an n x n by n x n product, best of ``reps``)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
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


def optimizer_step(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], None]:
    """One training step as a closure: ``loss_fn(model).backward()``, then AdamW (``_optimizer``, made here over
    ``model``'s parameters) steps and zeroes the gradients. ``loss_fn`` may run a compiled wrapper of ``model``."""
    opt = _optimizer(model)

    def run():
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def model_config(model: str | None, overrides: dict, dtype: torch.dtype) -> ModelConfig:
    """The benchmark's own configuration (``model`` None) or preset ``model``, with ``overrides`` applied."""
    if model is None:
        return ModelConfig(**{**CONFIG, **overrides}, params_dtype=dtype)
    return preset_config(model, **overrides, params_dtype=dtype)


def _steps(config: ModelConfig, batch: int, seq: int, compile_: bool, hf_: bool, device: str) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    ours = GPTModel(config, device=device).train()
    hf = _hf_model(config, config.params_dtype).to(device) if hf_ else None

    def mine(model):
        return model(ids, labels=labels).sum() / (labels != -100).sum()

    def theirs(model):  # HF shifts the labels itself
        return model(input_ids=ids, labels=ids).loss

    fns = {"megacore": optimizer_step(ours, mine)}
    if hf_:
        fns["hf"] = optimizer_step(hf, theirs)
    if compile_:
        torch._dynamo.reset()
        ours_c = torch.compile(ours)
        fns["megacore_compile"] = optimizer_step(ours, lambda m: mine(ours_c))
        if hf_:
            hf_c = torch.compile(hf)
            fns["hf_compile"] = optimizer_step(hf, lambda m: theirs(hf_c))
    return fns


def profile_steps(step, steps: int, device: str) -> None:
    """Runs ``step`` twice to warm up, then ``steps`` times between cudaProfilerStart/Stop, each in an NVTX range
    ``train_step <i>``: what ``nsys profile --capture-range=cudaProfilerApi`` records."""
    for _ in range(2):
        step()
    _sync(device)
    cuda = device.startswith("cuda")
    with torch.cuda.profiler.profile() if cuda else contextlib.nullcontext():
        for i in range(steps):
            with torch.cuda.nvtx.range(f"train_step {i}") if cuda else contextlib.nullcontext():
                step()
        _sync(device)


def _flops(per_second: float) -> str:
    return f"{per_second / 1e12:,.0f} TFLOP/s" if per_second >= 1e13 else f"{per_second / 1e9:,.0f} GFLOP/s"


def _override(text: str) -> tuple[str, object]:
    """``field=value`` -> (field, value), the value read as a Python literal when it is one (2048, 0.0, True)."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"expected field=value, got {text!r}")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


HEADER = ("| dtype | batch x seq | megacore tok/s | HF tok/s | megacore compile tok/s | HF compile tok/s | "
          "megacore MFU | vs HF | vs HF compile |\n|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="a tiny batch, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face columns (megacore alone)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--model", default=None,
                        help="a preset of megacore.models (gpt2-small, gpt-1.3b, ...) instead of the default config")
    parser.add_argument("--override", nargs="+", type=_override, default=[], metavar="FIELD=VALUE",
                        help="ModelConfig fields to change, e.g. hidden_dropout=0.0")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --quick 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; --quick 64)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the peak to compute MFU against (default: the datasheet bf16 peak of a known GPU, "
                             "else a matmul measured in this run)")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="instead of the table: N megacore steps (after 2 warm-ups) between cudaProfilerStart "
                             "and Stop, for nsys profile --capture-range=cudaProfilerApi")
    args = parser.parse_args(argv)
    hf_ = not args.no_hf and not args.profile_steps
    if hf_:
        try:
            import transformers  # noqa: F401
        except ImportError:
            parser.error("the training benchmark compares with Hugging Face: pip install transformers (or --no-hf)")
    device = args.device
    batch, seq = QUICK_SHAPE if args.quick else SHAPE
    batch, seq = args.batch or batch, args.seq or seq
    overrides = dict(args.override)
    if args.profile_steps:
        config = model_config(args.model, overrides, DTYPES[args.dtypes[0]])
        fns = _steps(config, batch, seq, compile_=False, hf_=False, device=device)
        profile_steps(fns["megacore"], args.profile_steps, device)
        print(f"megacore bench train: profiled {args.profile_steps} steps of {args.model or 'the default config'} "
              f"({args.dtypes[0]}, {batch} x {seq}) on {describe_machine(device)}")
        return 0
    print(f"# megacore training-step benchmark (forward + backward + AdamW) — {args.model or 'default config'}"
          f"{' ' + str(overrides) if overrides else ''} — {describe_machine(device)}")
    print(HEADER, flush=True)
    for name in args.dtypes:
        dtype = DTYPES[name]
        config = model_config(args.model, overrides, dtype)
        fns = _steps(config, batch, seq, not args.no_compile, hf_, device)
        times = _time(fns, args.reps, min_time=1.0, device=device)
        if args.peak_tflops:
            peak, source = args.peak_tflops * 1e12, "given"
        elif (peak := datasheet_peak(device, dtype)) is not None:
            source = "bf16 dense peak"
        else:
            peak, source = gemm_flops(dtype, device=device), "measured GEMM"
        tokens = batch * seq
        tps = {k: tokens / v for k, v in times.items()}
        mfu = tps["megacore"] * flops_per_token(config, seq) / peak
        dash = "-"
        hf_tps = f"{tps['hf']:,.0f}" if "hf" in tps else dash
        compiled = " | ".join(f"{tps[k]:,.0f}" if k in tps else dash for k in ("megacore_compile", "hf_compile"))
        vs_hf = f"{times['hf'] / times['megacore']:.2f}x" if "hf" in times else dash
        vs_compile = (f"{times['hf_compile'] / min(times['megacore'], times['megacore_compile']):.2f}x"
                      if "hf_compile" in times else dash)
        print(f"| {name} | {batch} x {seq} | {tps['megacore']:,.0f} | {hf_tps} | {compiled} | "
              f"{100 * mfu:.0f}% of {_flops(peak)} ({source}) | {vs_hf} | {vs_compile} |", flush=True)
        del fns
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\nvs HF: HF eager / megacore eager. vs HF compile: HF compiled / megacore's faster variant (a user "
          "runs whichever is faster). MFU: megacore eager's model FLOP/s over the peak named in the cell.")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
