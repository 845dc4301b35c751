"""Whole-model benchmark: training throughput (forward + backward, tokens/s) of megacore's presets against
the Hugging Face ``transformers`` model with the same configuration, each eager and under
``torch.compile``, in one run.

    python -m megacore.benchmarks model [--models gpt-tiny bert-tiny] [--dtypes float32 bfloat16] [--quick]
    megacore bench model ...          (the same)
    python benchmarks/model.py ...    (the same)

The same sizes, dropout rates and loss for both sides: GPT trains a causal LM on every token; BERT a
masked LM on 15% of the tokens (the loss over the masked ones). ``transformers`` is needed (an extra).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

import megacore
from megacore.benchmarks.ops import DTYPES, _time, describe_machine
from megacore.models.registry import build, preset_config

# preset -> (batch, seq)
SHAPES = {"gpt-tiny": (8, 256), "bert-tiny": (16, 128)}
QUICK_SHAPES = {"gpt-tiny": (2, 32), "bert-tiny": (2, 32)}


def _hf_model(name: str, dtype: torch.dtype):
    """The transformers model with the preset's configuration (random weights: nothing is downloaded)."""
    import transformers

    c = preset_config(name)
    if name.startswith("gpt"):
        config = transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_position_embeddings, n_embd=c.hidden_size,
            n_layer=c.num_layers, n_head=c.num_attention_heads, n_inner=c.ffn_hidden_size,
            activation_function="gelu_new", resid_pdrop=c.hidden_dropout, embd_pdrop=c.hidden_dropout,
            attn_pdrop=c.attention_dropout, layer_norm_epsilon=c.norm_epsilon)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_attention_heads, intermediate_size=c.ffn_hidden_size,
            max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
            hidden_dropout_prob=c.hidden_dropout, attention_probs_dropout_prob=c.attention_dropout,
            layer_norm_eps=c.norm_epsilon)
        model = transformers.BertForMaskedLM(config)
    return model.to(dtype).train()


def _steps(name: str, dtype: torch.dtype, batch: int, seq: int, compile_: bool) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    vocab = preset_config(name).vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    if name.startswith("gpt"):
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100

        def mine(model):
            return lambda: model(ids, labels=labels).sum().div((labels != -100).sum()).backward()

        def theirs(model):  # HF shifts the labels itself: pass the inputs
            return lambda: model(input_ids=ids, labels=ids).loss.backward()
    else:
        masked = torch.rand(batch, seq, generator=torch.Generator().manual_seed(1)) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))

        def mine(model):
            return lambda: model(ids, labels=labels).loss.backward()

        def theirs(model):
            return lambda: model(input_ids=ids, labels=labels).loss.backward()

    ours = build(name, params_dtype=dtype).train()
    hf = _hf_model(name, dtype)
    fns = {"megacore": mine(ours), "hf": theirs(hf)}
    if compile_:
        torch._dynamo.reset()
        fns["megacore_compile"] = mine(torch.compile(ours))
        fns["hf_compile"] = theirs(torch.compile(hf))
    return fns


HEADER = ("| model | batch x seq | dtype | megacore tok/s | HF tok/s | megacore compile tok/s | HF compile tok/s "
          "| vs HF | vs HF compile |\n|---|---|---|---|---|---|---|---|---|")


def run(models, dtypes, quick: bool, compile_: bool, reps: int) -> list[dict]:
    rows = []
    for name in models:
        batch, seq = (QUICK_SHAPES if quick else SHAPES)[name]
        for dtype_name in dtypes:
            times = _time(_steps(name, DTYPES[dtype_name], batch, seq, compile_), reps, min_time=1.0)
            tokens = batch * seq
            row = dict(model=name, shape=f"{batch} x {seq}", dtype=dtype_name,
                       **{f"{k}_tps": tokens / v for k, v in times.items()})
            row["vs_hf"] = times["hf"] / times["megacore"]
            if "hf_compile" in times:
                row["vs_hf_compile"] = times["hf_compile"] / times["megacore_compile"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    def tps(key):
        return f"{r[key]:,.0f}" if key in r else "-"

    vs_compile = f"{r['vs_hf_compile']:.2f}x" if "vs_hf_compile" in r else "-"
    return (f"| {r['model']} | {r['shape']} | {r['dtype']} | {tps('megacore_tps')} | {tps('hf_tps')} | "
            f"{tps('megacore_compile_tps')} | {tps('hf_compile_tps')} | {r['vs_hf']:.2f}x | {vs_compile} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny batches, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("the model benchmark compares with Hugging Face: pip install transformers")
    print(f"# megacore model benchmark (training step: forward + backward) — {describe_machine('cpu')}")
    print(HEADER, flush=True)
    run(args.models, args.dtypes, args.quick, not args.no_compile, args.reps)
    print("\nvs HF: HF eager time / megacore eager time; vs HF compile: HF compiled / megacore compiled.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
