"""Generation benchmark: greedy decoding with a KV cache, ``megacore.training.generate`` against transformers'
``GPT2LMHeadModel.generate`` on the same weights, eager and under ``torch.compile``, in one run.

    python -m megacore.benchmarks generate [--model gpt2-small] [--batch-sizes 1 8] [--prompt-len 128]
                                           [--new-tokens 128] [--dtype float32] [--quick] [--json PATH]
    megacore bench generate ...          (the same)
    python benchmarks/generate.py ...    (the same)

megacore's preset is built from a seed and exported with ``megacore.interop.hf.to_hf``, so both libraries run
the same weights on the same random prompts. Per batch size and mode it reports:

* **prefill tok/s**: batch x prompt tokens over the time from calling generate to the first new token (the
  prompt's forward that fills the cache, its last position's logits and the argmax: time to first token);
* **decode tok/s**: batch x (new tokens - 1) over the time from the first new token to the last, one forward
  of one position per token;
* **megacore / HF**: megacore's throughput over transformers' (above 1: megacore is faster);
* **tokens**: whether every variant of the row produced exactly transformers eager's tokens (greedy on the
  same weights should); a difference is shown as a MISMATCH, never hidden.

Both sides are timed the same way: each library streams its tokens as they are chosen (megacore's
``stream=`` callback, a transformers ``BaseStreamer``), and the benchmark timestamps them. transformers runs
with ``do_sample=False, use_cache=True`` (its DynamicCache), ``min_new_tokens = max_new_tokens``, an all-ones
attention mask, ``pad_token_id`` set and ``eos_token_id=None``: it never stops early and no logits processor
changes the argmax (with an EOS id, ``min_new_tokens`` masks EOS, which megacore's greedy does not).
Compiled variants: megacore's ``forward_with_cache`` (the prefill and decode step ``generate`` calls) under
``torch.compile``; transformers' ``model.forward = torch.compile(model.forward)``. A compile that fails or
outruns ``--compile-timeout`` is reported as ``n/a (reason)``. ``transformers`` is needed (an extra).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional
from unittest import mock

import torch

from megacore.benchmarks.ops import DTYPES, available_cores, describe_machine
from megacore.models.gpt import GPTModel
from megacore.models.registry import PRESETS, build

# the module: `megacore.training.generate` is also the name of the function that package exports
_generate = importlib.import_module("megacore.training.generate")

_NAME = "megacore bench generate"
GPT_PRESETS = [name for name, (model_cls, _) in PRESETS.items() if model_cls is GPTModel]
SIDES = ("megacore", "transformers")
PROMPT_SEED, MODEL_SEED = 1, 0


@dataclass
class Settings:
    model: str
    dtype: str
    batch_sizes: list[int]
    prompt_len: int
    new_tokens: int
    repeats: int
    compile: bool
    compile_timeout: float


@dataclass
class Run:
    """One generate call: when it started, when each new token was streamed, when it returned, its new tokens
    ``[b, new_tokens]``."""

    start: float
    marks: list[float]
    end: float
    tokens: torch.Tensor


# ---- the variants ------------------------------------------------------------------------------------------------


def _compile(fn: Callable) -> Callable:
    """torch.compile with its defaults (dynamic shapes once a size changes); one place, so a test can replace it."""
    return torch.compile(fn)


def megacore_variant(model, ids: torch.Tensor, new_tokens: int, compiled: bool) -> Callable[[], Run]:
    """A call of ``megacore.training.generate(model, ids, new_tokens, greedy=True)``, timestamping each streamed
    token. ``compiled``: ``forward_with_cache`` (generate's prefill and decode step) is compiled, and generate
    calls the compiled one (it looks the function up in its module at each call)."""
    step = _compile(_generate.forward_with_cache) if compiled else _generate.forward_with_cache

    def run() -> Run:
        marks: list[float] = []
        with mock.patch.object(_generate, "forward_with_cache", step) if compiled else contextlib.nullcontext():
            start = time.perf_counter()
            tokens = _generate.generate(model, ids, new_tokens, greedy=True,
                                        stream=lambda _: marks.append(time.perf_counter()))
            end = time.perf_counter()
        return Run(start, marks, end, tokens)

    return run


def _token_clock(marks: list[float]):
    """A transformers streamer appending the time of each new token to ``marks``. generate puts the prompt
    first (before the prefill), then each new token ``[b]`` as it is chosen."""
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                marks.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    return TokenClock()


def transformers_variant(hf_model, ids: torch.Tensor, new_tokens: int) -> Callable[[], Run]:
    """A call of ``hf_model.generate`` (greedy, KV cache, exactly ``new_tokens`` tokens), timestamping each
    streamed token. The model is compiled by the caller (``hf_model.forward = torch.compile(...)``)."""
    mask = torch.ones_like(ids)
    pad = hf_model.config.vocab_size - 1

    def run() -> Run:
        marks: list[float] = []
        streamer = _token_clock(marks)
        start = time.perf_counter()
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=None,
                                streamer=streamer)
        end = time.perf_counter()
        return Run(start, marks, end, out[:, ids.shape[1]:])

    return run


def _compile_hf(hf_model, ids: torch.Tensor, new_tokens: int) -> Callable[[], Run]:
    """transformers' generate with ``hf_model.forward = torch.compile(hf_model.forward)``."""
    hf_model.forward = _compile(hf_model.forward)
    return transformers_variant(hf_model, ids, new_tokens)


# ---- timing ------------------------------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raises _Timeout in the main thread after ``seconds`` (SIGALRM; no limit elsewhere or for 0). Yields a
    list that holds True once the alarm fired: torch.compile may wrap the exception in its own."""
    fired = [False]
    if not seconds or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def on_alarm(signum, frame):
        fired[0] = True
        raise _Timeout(f"did not finish in {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _reason(error: BaseException, fired: bool, seconds: float) -> str:
    if fired:
        return f"compile + first runs took over {seconds:g} s (--compile-timeout)"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Variant:
    """One side (megacore or transformers) in one mode (eager or compile): its call, its timed runs, and why it
    is n/a if it is."""

    side: str
    mode: str
    run: Optional[Callable[[], Run]] = None
    runs: list[Run] = field(default_factory=list)
    error: Optional[str] = None
    warmup_s: float = 0.0
    graphs: Optional[int] = None


def measure(variants: list[Variant], repeats: int, compile_timeout: float) -> None:
    """Warms up each variant (eager: one call; compiled: two, the first compiling the prefill and decode graphs,
    the second any recompile for the sizes that changed), then times ``repeats`` rounds, one call of each variant
    per round, so that a change in the machine's load falls on all of them. A compiled variant that raises or
    outruns ``compile_timeout`` gets ``error`` and no runs; an eager one that raises stops the benchmark."""
    for v in variants:
        if v.error:  # could not even be set up
            continue
        compiled = v.mode == "compile"
        graphs = _graphs()
        start = time.perf_counter()
        fired = [False]
        try:
            with _time_limit(compile_timeout if compiled else 0) as fired:
                for _ in range(2 if compiled else 1):
                    v.run()
        except Exception as e:  # noqa: BLE001  (a compiler's failure is a result, reported in the row)
            if not compiled:
                raise
            v.error = _reason(e, fired[0], compile_timeout)
        if compiled and fired[0] and v.error is None:
            v.error = _reason(_Timeout(), True, compile_timeout)
        v.warmup_s = time.perf_counter() - start
        if compiled:
            v.graphs = _graphs() - graphs
            if v.error:
                torch._dynamo.reset()
    for _ in range(repeats):
        for v in variants:
            if v.error:
                continue
            try:
                v.runs.append(v.run())
            except Exception as e:  # noqa: BLE001
                if v.mode != "compile":
                    raise
                v.error, v.runs = _reason(e, False, compile_timeout), []


def _mismatch(tokens: torch.Tensor, reference: torch.Tensor) -> Optional[str]:
    """None when equal, else which sequences differ and from which new token on."""
    if tokens.shape != reference.shape:
        return f"{list(tokens.shape)} tokens vs {list(reference.shape)}"
    differ = tokens != reference  # [b, n]
    if not bool(differ.any()):
        return None
    first = int(differ.any(0).nonzero()[0]) + 1
    return f"{int(differ.any(1).sum())}/{tokens.shape[0]} sequences differ, first at new token {first}"


def summarize(v: Variant, batch: int, prompt_len: int, new_tokens: int, reference: Optional[torch.Tensor]) -> dict:
    """The JSON of one variant: medians over its runs of prefill_s (call to first token), decode_s (first token
    to last), total_s (call to return), the throughputs, and whether its tokens equal ``reference``."""
    out = {"error": v.error, "warmup_s": v.warmup_s}
    if v.graphs is not None:
        out["graphs_compiled"] = v.graphs
    if v.error:
        return out
    if any(len(r.marks) != new_tokens for r in v.runs):  # both must stream every token, or the split is wrong
        raise RuntimeError(f"{_NAME}: {v.side} {v.mode} streamed {[len(r.marks) for r in v.runs]} tokens per run, "
                           f"expected {new_tokens}")
    prefill = statistics.median(r.marks[0] - r.start for r in v.runs)
    decode = statistics.median(r.marks[-1] - r.marks[0] for r in v.runs)
    total = statistics.median(r.end - r.start for r in v.runs)
    tokens = v.runs[-1].tokens
    mismatch = _mismatch(tokens, reference) if reference is not None else None
    return dict(out, prefill_s=prefill, decode_s=decode, total_s=total,
                prefill_tok_s=batch * prompt_len / prefill, decode_tok_s=batch * (new_tokens - 1) / decode,
                tokens_match=None if reference is None else mismatch is None, mismatch=mismatch)


# ---- the run -----------------------------------------------------------------------------------------------------


def build_models(model_name: str, dtype: torch.dtype, compile_: bool):
    """(megacore model, transformers model, a second transformers model to compile or None), all with the weights
    of the megacore preset built from ``MODEL_SEED``, in eval mode."""
    from megacore.interop.hf import to_hf

    torch.manual_seed(MODEL_SEED)
    model = build(model_name, params_dtype=dtype).eval()
    return model, to_hf(model).eval(), to_hf(model).eval() if compile_ else None


def run_batch(models, settings: Settings, batch: int) -> list[dict]:
    """The rows (eager, then compile) of one batch size."""
    model, hf, hf_to_compile = models
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, settings.prompt_len), generator=torch.Generator().manual_seed(PROMPT_SEED))
    n = settings.new_tokens
    variants = [Variant("megacore", "eager", megacore_variant(model, ids, n, compiled=False)),
                Variant("transformers", "eager", transformers_variant(hf, ids, n))]
    if settings.compile:
        torch._dynamo.reset()  # this batch size's graphs only
        with contextlib.suppress(AttributeError):
            del hf_to_compile.forward  # the previous batch size's compiled forward
        mc_compiled, hf_compiled = Variant("megacore", "compile"), Variant("transformers", "compile")
        for v, make in ((mc_compiled, lambda: megacore_variant(model, ids, n, compiled=True)),
                        (hf_compiled, lambda: _compile_hf(hf_to_compile, ids, n))):
            try:
                v.run = make()
            except Exception as e:  # noqa: BLE001
                v.error = _reason(e, False, settings.compile_timeout)
        variants += [mc_compiled, hf_compiled]
    measure(variants, settings.repeats, settings.compile_timeout)
    by_key = {(v.side, v.mode): v for v in variants}
    reference_variant = by_key["transformers", "eager"]
    reference = reference_variant.runs[-1].tokens
    rows = []
    for mode in ("eager", "compile") if settings.compile else ("eager",):
        row = {"batch": batch, "mode": mode}
        for side in SIDES:
            v = by_key[side, mode]
            row[side] = summarize(v, batch, settings.prompt_len, n, None if v is reference_variant else reference)
        mc, tf = row["megacore"], row["transformers"]
        for phase in ("prefill", "decode"):
            ok = mc["error"] is None and tf["error"] is None
            row[f"{phase}_ratio"] = mc[f"{phase}_tok_s"] / tf[f"{phase}_tok_s"] if ok else None
        compared = [row[side]["tokens_match"] for side in SIDES if row[side].get("tokens_match") is not None]
        row["tokens_match"] = all(compared) if compared else None
        rows.append(row)
    return rows


# ---- output ------------------------------------------------------------------------------------------------------

HEADER = ("| batch | mode | megacore prefill tok/s | HF prefill tok/s | prefill megacore/HF | megacore decode tok/s "
          "| HF decode tok/s | decode megacore/HF | tokens |\n|---|---|---:|---:|---:|---:|---:|---:|---|")


def _cell(side: dict, key: str) -> str:
    if side["error"]:
        reason = side["error"] if len(side["error"]) <= 80 else side["error"][:77] + "..."
        return f"n/a ({reason})".replace("|", "/")
    return f"{side[key]:,.0f}"


def _tokens_cell(row: dict) -> str:
    if row["tokens_match"] is None:
        return "-"
    if row["tokens_match"]:
        return "identical"
    return "MISMATCH: " + "; ".join(f"{side} {row[side]['mismatch']}" for side in SIDES
                                     if row[side].get("mismatch"))


def format_row(row: dict) -> str:
    def ratio(key):
        return f"{row[key]:.2f}x" if row[key] is not None else "-"

    mc, tf = row["megacore"], row["transformers"]
    return (f"| {row['batch']} | {row['mode']} | {_cell(mc, 'prefill_tok_s')} | {_cell(tf, 'prefill_tok_s')} | "
            f"{ratio('prefill_ratio')} | {_cell(mc, 'decode_tok_s')} | {_cell(tf, 'decode_tok_s')} | "
            f"{ratio('decode_ratio')} | {_tokens_cell(row)} |")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_NAME, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, choices=GPT_PRESETS,
                        help="the megacore preset to build (default gpt2-small; --quick gpt-tiny)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="prompts per generate call (default 1 8; --quick 1 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --quick 16)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per sequence, >= 2 (default 128; --quick 8)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed generate calls per variant, after the warm-up; the median is reported "
                             "(default 3; --quick 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters' dtype")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--compile", action="store_true",
                        help="run the torch.compile rows with --quick too (which skips them: compiling takes minutes "
                             "on CPU)")
    parser.add_argument("--compile-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="a compiled variant whose compile and two warm-up calls take longer is reported as n/a "
                             "(default 900; 0: no limit)")
    parser.add_argument("--quick", action="store_true",
                        help="gpt-tiny, prompt 16, 8 new tokens, batch 1 and 2, one repeat, no compile: a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core this process "
                        "may run on)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        parser.error("the generation benchmark compares with Hugging Face: pip install transformers")
    quick = args.quick
    settings = Settings(
        model=args.model or ("gpt-tiny" if quick else "gpt2-small"), dtype=args.dtype,
        batch_sizes=args.batch_sizes or ([1, 2] if quick else [1, 8]),
        prompt_len=args.prompt_len or (16 if quick else 128), new_tokens=args.new_tokens or (8 if quick else 128),
        repeats=args.repeats or (1 if quick else 3), compile=not args.no_compile and (args.compile or not quick),
        compile_timeout=args.compile_timeout)
    if min(settings.batch_sizes + [settings.prompt_len, settings.repeats, args.threads or 1]) < 1 or settings.new_tokens < 2:
        parser.error("--batch-sizes, --prompt-len, --repeats and --threads must be >= 1, --new-tokens >= 2 (decode is timed "
                     "from the first new token to the last)")
    positions = PRESETS[settings.model][1]["max_position_embeddings"]
    if settings.prompt_len + settings.new_tokens > positions:
        parser.error(f"--prompt-len {settings.prompt_len} + --new-tokens {settings.new_tokens} exceeds "
                     f"{settings.model}'s {positions} positions")

    cores = available_cores()
    torch.set_num_threads(args.threads or cores)
    machine = describe_machine()
    print(f"# megacore generation benchmark (greedy, KV cache) — {settings.model}, {settings.dtype}, prompt "
          f"{settings.prompt_len}, {settings.new_tokens} new tokens, median of {settings.repeats} — {machine}, "
          f"{cores} cores, transformers {transformers.__version__}", flush=True)
    models = build_models(settings.model, DTYPES[settings.dtype], settings.compile)
    print(HEADER, flush=True)
    rows = []
    for batch in settings.batch_sizes:
        for row in run_batch(models, settings, batch):
            rows.append(row)
            print(format_row(row), flush=True)
    print("\nprefill tok/s: batch x prompt tokens / time from the generate call to the first new token. decode tok/s: "
          "batch x (new tokens - 1) / time from the first new token to the last. megacore/HF: megacore's tok/s over "
          "transformers' in the same mode. tokens: each variant of the row against transformers eager's tokens.")
    for row in rows:
        if row["mode"] == "compile":
            warmups = ", ".join(f"{side} n/a" if row[side]["error"] else
                                f"{side} {row[side]['warmup_s']:.0f} s ({row[side]['graphs_compiled']} graphs)"
                                for side in SIDES)
            print(f"compile warm-up (compiling + 2 calls), batch {row['batch']}: {warmups}")
        if row["tokens_match"] is False:
            print(f"WARNING: batch {row['batch']} {row['mode']}: tokens differ from transformers eager's "
                  f"({_tokens_cell(row)}); in bfloat16, rounding can flip near-tied argmaxes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "generate", "machine": machine, "cores": cores, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "settings": asdict(settings), "timing": "streamed token timestamps", "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
