"""Fused-op benchmark: megacore vs the same math in PyTorch eager vs torch.compile of that math.

For every op at a realistic size it times the forward alone and forward+backward, in one run, and
reports each variant's time, megacore's speed-up over the other two, and megacore's effective memory
bandwidth (the fewest bytes the op must move: every input read once, every output written once) as a
fraction of a plain tensor copy's bandwidth measured in the same run.

    python -m megacore.benchmarks ops [--dtypes float32 bfloat16] [--ops bias_gelu ...] [--quick]
    megacore bench ops ...            (the same)
    python benchmarks/ops.py ...      (the same)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import megacore
from megacore import ops
from megacore.ops import reference as ref

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    """One op at one size. ``make(dtype, requires_grad)`` returns (inputs, kwargs-free closure args);
    ``megacore_fn`` and ``eager_fn`` take the inputs and return the output to backprop from."""

    name: str
    shape: str
    make: Callable[[torch.dtype, bool], list]
    megacore_fn: Callable
    eager_fn: Callable
    elements: int  # elements of the main tensor
    fwd_passes: float  # minimum tensor-sized reads + writes of the forward
    bwd_passes: float  # ... of the backward
    grad_inputs: tuple[int, ...] = (0,)  # which inputs get gradients
    backward: bool = True  # also time forward+backward (not for decoding's GEMMs)
    cycle_weights: bool = False  # inputs are [x, weights [n, ...]]: each call takes the next weight (_cycling)


def _randn(shape, dtype, requires_grad, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype).requires_grad_(requires_grad)


def _weight_pool(out: int, fan_in: int, pool_bytes: int):
    """make() of a decoding GEMM: [x [rows, in], weights [n, out, in]] with enough weights (n * out * in elements
    of the dtype >= pool_bytes) that each call reads a weight that is no longer in any cache, as decoding does
    (gpt2-small's 498 MB of weights per token exceed every cache). The functions take weights[next index]."""
    def make(rows):
        def inputs(dtype, requires_grad):
            n = max(2, -(-pool_bytes // (out * fan_in * torch.finfo(dtype).bits // 8)))
            return [_randn((rows, fan_in), dtype, False), _randn((n, out, fan_in), dtype, False, 0.05)]
        return inputs
    return make


def _cycling(fn: Callable, state: dict) -> Callable:
    """fn(x, weights[i]) with i advancing on every call. The variants of a case share ``state``, so each call
    reads the weight after the one the previous call (of any variant) read: never a weight still in cache."""

    def call(x, weights):
        state["i"] = (state.get("i", 0) + 1) % weights.shape[0]
        return fn(x, weights[state["i"]])
    return call


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    t = 2048 if quick else 8192  # tokens
    h = 1024
    ffn = 2816  # a gated MLP's width at h = 1024
    b, heads, s = (2, 16, 512) if quick else (8, 16, 1024)
    vocab, ce_tokens = (32000, 1024) if quick else (32000, 4096)
    seq, batch = (512, 4) if quick else (2048, 4)
    p = 0.1

    def mask_for(dtype):
        # padding mask [b, 1, s, s]: the last quarter of the keys of every other sequence excluded
        m = torch.zeros(b, 1, s, s, dtype=torch.bool)
        m[::2, :, :, 3 * s // 4 :] = True
        return m

    cos, sin = ops.rotary_tables(seq, 64, device=device)

    def dropout_eager(x, bias, residual):
        return residual + torch.nn.functional.dropout(x + bias, p=p, training=True)

    # decoding's GEMMs: gpt2's fc1 weight [3072, 768] against 1-16 rows (one token per sequence), weights cold
    fc1_out, fc1_in = 3072, 768
    pool = _weight_pool(fc1_out, fc1_in, (64 if quick else 512) * 2**20)
    linear_cases = [
        Case(f"linear_rows{rows}", f"{rows}x{fc1_in} @ {fc1_out}x{fc1_in}^T, cold weights", pool(rows),
             ops.linear, torch.nn.functional.linear,
             fc1_out * fc1_in, 1, 0, backward=False, cycle_weights=True)  # the weight's bytes: the rows are noise next to it
        for rows in (1, 4, 8, 16)
    ]

    return linear_cases + [
        Case(
            "bias_gelu", f"{t}x{4 * h}",
            lambda d, g: [_randn((t, 4 * h), d, g), _randn((4 * h,), d, g)],
            lambda x, bias: ops.bias_gelu(x, bias, "tanh"),
            lambda x, bias: ref.bias_gelu(x, bias, "tanh"),
            t * 4 * h, 2, 3, (0, 1),
        ),
        Case(
            "bias_relu", f"{t}x{4 * h}",
            lambda d, g: [_randn((t, 4 * h), d, g), _randn((4 * h,), d, g)],
            lambda x, bias: ops.bias_relu(x, bias),
            lambda x, bias: ref.bias_relu(x, bias),
            t * 4 * h, 2, 3, (0, 1),
        ),
        Case(  # LLaMA's MLP: fc1 gives [gate | up], ffn = 8h/3 rounded up to a multiple of 256
            "bias_gated", f"{t}x{2 * ffn} swiglu",
            lambda d, g: [_randn((t, 2 * ffn), d, g), _randn((2 * ffn,), d, g)],
            lambda x, bias: ops.bias_gated(x, bias, "swiglu"),
            lambda x, bias: ref.bias_gated(x, bias, "swiglu"),
            t * 2 * ffn, 1.5, 2.5, (0, 1),  # x is read once, the output is half its size
        ),
        Case(
            "bias_dropout_add", f"{t}x{h} p={p}",
            lambda d, g: [_randn((t, h), d, g), _randn((h,), d, g), _randn((t, h), d, g)],
            lambda x, bias, residual: ops.bias_dropout_add(x, bias, residual, p),
            dropout_eager,
            t * h, 3, 2, (0, 1, 2),
        ),
        Case(
            "layer_norm", f"{t}x{h}",
            lambda d, g: [_randn((t, h), d, g), _randn((h,), d, g), _randn((h,), d, g)],
            lambda x, w, bb: ops.layer_norm(x, w, bb),
            lambda x, w, bb: ref.layer_norm(x, w, bb),
            t * h, 2, 3, (0, 1, 2),
        ),
        Case(
            "rms_norm", f"{t}x{h}",
            lambda d, g: [_randn((t, h), d, g), _randn((h,), d, g)],
            lambda x, w: ops.rms_norm(x, w),
            lambda x, w: ref.rms_norm(x, w),
            t * h, 2, 3, (0, 1),
        ),
        Case(
            "scaled_masked_softmax", f"{b}x{heads}x{s}x{s}",
            lambda d, g: [_randn((b, heads, s, s), d, g), mask_for(d)],
            lambda x, m: ops.scaled_masked_softmax(x, m, 0.125),
            lambda x, m: ref.scaled_masked_softmax(x, m, 0.125),
            b * heads * s * s, 2, 3,
        ),
        Case(
            "scaled_causal_softmax", f"{b}x{heads}x{s}x{s}",
            lambda d, g: [_randn((b, heads, s, s), d, g)],
            lambda x: ops.scaled_causal_softmax(x, 0.125),
            lambda x: ref.scaled_causal_softmax(x, 0.125),
            b * heads * s * s, 2, 3,
        ),
        Case(  # T5: a learned relative-position bias per head, decoder self-attention
            "scaled_bias_softmax", f"{b}x{heads}x{s}x{s} bias 1x{heads}x{s}x{s} causal",
            lambda d, g: [_randn((b, heads, s, s), d, g), _randn((1, heads, s, s), d, g)],
            lambda x, bias: ops.scaled_bias_softmax(x, bias, None, 0.125, causal=True),
            lambda x, bias: ref.scaled_bias_softmax(x, bias, None, 0.125, causal=True),
            b * heads * s * s, 2 + 1 / b, 3 + 1 / b, (0, 1),
        ),
        Case(  # ALiBi-like: one bias row per head, with a padding mask
            "scaled_bias_softmax_alibi", f"{b}x{heads}x{s}x{s} bias 1x{heads}x1x{s} mask",
            lambda d, g: [_randn((b, heads, s, s), d, g), _randn((1, heads, 1, s), d, g), mask_for(d)],
            lambda x, bias, m: ops.scaled_bias_softmax(x, bias, m, 0.125),
            lambda x, bias, m: ref.scaled_bias_softmax(x, bias, m, 0.125),
            b * heads * s * s, 2, 3, (0, 1),
        ),
        Case(
            "apply_rotary_emb", f"{seq}x{batch}x16x64",
            lambda d, g: [_randn((seq, batch, 16, 64), d, g)],
            lambda x: ops.apply_rotary_emb(x, cos, sin),
            lambda x: ref.apply_rotary_emb(x, cos, sin),
            seq * batch * 16 * 64, 2, 2,
        ),
        Case(
            "cross_entropy", f"{ce_tokens}x{vocab}",
            lambda d, g: [_randn((ce_tokens, vocab), d, g, 3.0), torch.randint(0, vocab, (ce_tokens,))],
            lambda x, tgt: ops.cross_entropy(x, tgt),
            lambda x, tgt: ref.cross_entropy(x, tgt),
            ce_tokens * vocab, 1, 2,
        ),
    ]  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(
    fns: dict[str, Callable[[], object]], reps: int, min_time: float = 0.2, device: str = "cpu"
) -> dict[str, float]:
    """Median seconds per call of each fn, after two warm-up calls each. The variants are timed in
    turns (one call of each per round, at least `reps` rounds and `min_time` seconds), so a change in
    the machine's state during the run (page-cache, allocator, another process) hits all of them alike
    instead of whichever happened to run then; the order rotates every round, so none always runs first."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < reps or (time.perf_counter() - start < min_time and rounds < 5 * reps):
        names = list(fns)
        for name in names[rounds % len(names):] + names[: rounds % len(names)]:  # each variant leads in turn
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(nbytes: int = 256 * 2**20, device: str = "cpu") -> tuple[float, float]:
    """GB/s (bytes read + bytes written) of ``dst.copy_(src)`` into a preallocated tensor, and of
    ``src.clone()``, which also allocates and first-touches its output, as every op returning a new
    tensor does: the page faults of a fresh large allocation are a real part of its cost on CPU."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    sec = _time({"copy": lambda: dst.copy_(src), "clone": lambda: src.clone()}, reps=10, device=device)
    return 2 * nbytes / sec["copy"] / 1e9, 2 * nbytes / sec["clone"] / 1e9


def _runner(fn: Callable, inputs: list, grad_idx: tuple[int, ...], backward: bool) -> Callable[[], object]:
    if not backward:

        def run_fwd():
            with torch.no_grad():
                return fn(*inputs)

        return run_fwd
    wrt = [inputs[i] for i in grad_idx]
    out0 = fn(*inputs)
    grad = torch.randn_like(out0)

    def run_fwd_bwd():
        out = fn(*inputs)
        return torch.autograd.grad(out, wrt, grad)

    return run_fwd_bwd


def _to(t, device: str):
    return t.detach().to(device).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def run(
    dtypes: list[str], only: list[str] | None, quick: bool, compile_: bool, reps: int, device: str = "cpu"
) -> tuple[list[dict], float, float]:
    torch.manual_seed(0)
    copy_gbs, clone_gbs = copy_bandwidth(device=device)
    rows = []
    for case in cases(quick, device):
        if only and case.name not in only:
            continue
        for dname in dtypes:
            dtype = DTYPES[dname]
            for backward in (False, True) if case.backward else (False,):
                inputs = [_to(t, device) for t in case.make(dtype, backward)]
                variants = {"megacore": case.megacore_fn, "eager": case.eager_fn}
                if compile_:
                    torch._dynamo.reset()
                    variants["compile"] = torch.compile(case.eager_fn, fullgraph=True, dynamic=False)
                if case.cycle_weights:
                    state: dict = {}
                    variants = {k: _cycling(fn, state) for k, fn in variants.items()}
                runners = {k: _runner(fn, inputs, case.grad_inputs, backward) for k, fn in variants.items()}
                times = _time(runners, reps, device=device)
                passes = case.fwd_passes + (case.bwd_passes if backward else 0)
                nbytes = passes * case.elements * inputs[0].element_size()
                gbs = nbytes / times["megacore"] / 1e9
                rows.append(
                    {
                        "op": case.name,
                        "shape": case.shape,
                        "dtype": dname,
                        "pass": "fwd+bwd" if backward else "fwd",
                        **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                        "vs_eager": times["eager"] / times["megacore"],
                        "vs_compile": times["compile"] / times["megacore"] if "compile" in times else math.nan,
                        "gbs": gbs,
                        "copy_frac": gbs / copy_gbs,
                        "clone_frac": gbs / clone_gbs,
                    }
                )
                print(_format_row(rows[-1]), flush=True)
                del inputs
    return rows, copy_gbs, clone_gbs


HEADER = (
    "| op | shape | dtype | pass | megacore ms | eager ms | compile ms | vs eager | vs compile | GB/s | % of copy | % of clone |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _format_row(r: dict) -> str:
    compile_ms = f"{r['compile_ms']:.2f}" if "compile_ms" in r else "-"
    vs_compile = f"{r['vs_compile']:.2f}x" if not math.isnan(r["vs_compile"]) else "-"
    return (
        f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {r['megacore_ms']:.2f} | {r['eager_ms']:.2f} | "
        f"{compile_ms} | {r['vs_eager']:.2f}x | {vs_compile} | {r['gbs']:.1f} | {100 * r['copy_frac']:.0f}% | "
        f"{100 * r['clone_frac']:.0f}% |"
    )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), or the machine's count where affinity is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_machine(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = megacore.build_info()
    thp = "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "off"
    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"megacore CPU kernels: {info['cpu_isa_active']}, torch huge-page allocations (THP_MEM_ALLOC_ENABLE): {thp}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per variant (median)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)"
    )
    args = parser.parse_args(argv)
    known = {c.name for c in cases(True)}
    if args.ops and not set(args.ops) <= known:
        parser.error(f"unknown op(s) {sorted(set(args.ops) - known)}; known: {sorted(known)}")

    if args.device.startswith("cuda") and not megacore.build_info()["cuda"]:
        parser.error("--device cuda needs megacore built with CUDA (see megacore info)")
    print(f"# megacore op benchmark — {describe_machine(args.device)}")
    print(HEADER, flush=True)
    _, copy_gbs, clone_gbs = run(args.dtypes, args.ops, args.quick, not args.no_compile, args.reps, args.device)
    print(
        f"\nsame run, read + write: tensor copy into a preallocated tensor {copy_gbs:.1f} GB/s; "
        f"clone (allocates its output) {clone_gbs:.1f} GB/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
