"""Whole-model benchmark: training throughput (tokens/s) of megacore's presets against the Hugging Face
``transformers`` model with the same configuration, each eager and under ``torch.compile``, in one run.

    python -m megacore.benchmarks model [--models gpt-tiny bert-tiny t5-tiny] [--dtypes float32 bfloat16] [--quick]
    python -m megacore.benchmarks model --models t5-small --source-len 512 --target-len 128
    megacore bench model ...          (the same)
    python benchmarks/model.py ...    (the same)

The same sizes, dropout rates and loss for both sides: GPT trains a causal LM on every token; BERT a
masked LM on 15% of the tokens (the loss over the masked ones); T5 a seq2seq LM over every target token.
GPT and BERT time forward + backward; T5 times a whole training step (forward, backward, AdamW: the same
optimizer for both) of both models on the same weights (transformers' ``T5ForConditionalGeneration`` is
megacore's exported by ``megacore.interop.hf.to_hf``), after checking that their logits and losses agree with
dropout off; its tokens are source + target. ``transformers`` is needed (an extra).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

import megacore
from megacore.benchmarks.ops import DTYPES, _time, available_cores, describe_machine
from megacore.benchmarks.train import optimizer_step
from megacore.models.registry import build, preset_config

# preset -> (batch, seq); T5: (batch, source, target), --source-len / --target-len replace the lengths
SHAPES = {"gpt-tiny": (8, 256), "bert-tiny": (16, 128), "t5-tiny": (16, 128, 32), "t5-small": (8, 128, 32),
          "t5-v1_1-tiny": (16, 128, 32), "t5-v1_1-small": (8, 128, 32)}
QUICK_SHAPES = {name: (2, 32, 8) if name.startswith("t5") else (2, 32) for name in SHAPES}
DEFAULT_MODELS = ["gpt-tiny", "bert-tiny", "t5-tiny", "t5-small"]
# T5's step-0 check (megacore vs transformers on the same weights, dropout off): the largest logit difference as a
# fraction of the logits' std, and the losses' relative difference. At init the logits' std is ~0.02 and the loss
# ~ln(vocab) whatever the weights; measured: fp32 4e-6 of the std, bf16 0.06 (transformers' bf16 loss is rounded
# to bf16: 0.6%); two different random inits differ by ~7 stds.
STEP0_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (0.25, 2e-2), torch.float16: (0.05, 5e-3)}


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


def _steps(name: str, dtype: torch.dtype, batch: int, lengths: tuple[int, ...],
           compile_: bool) -> dict[str, Callable[[], None]]:
    """The variants' step closures for preset ``name`` at ``batch`` x ``lengths`` ((seq,); T5: (source, target))."""
    if name.startswith("t5"):
        return _t5_steps(name, dtype, batch, *lengths, compile_)
    (seq,) = lengths
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


def _t5_steps(name: str, dtype: torch.dtype, batch: int, source: int, target: int,
              compile_: bool) -> dict[str, Callable[[], None]]:
    """Training steps (forward, backward, AdamW) of T5 preset ``name`` and of transformers'
    ``T5ForConditionalGeneration`` with its weights (``to_hf``): ``input_ids [batch, source]``, ``labels [batch,
    target]``, no padding. Raises RuntimeError if the two differ at step 0 (``_check_same_function``): then they do
    not compute the same function and their times would not compare."""
    from megacore.interop.hf import to_hf

    torch.manual_seed(0)
    ours = build(name, params_dtype=dtype)
    if ours.lm_head is None:
        hf = to_hf(ours)
    else:
        # T5 v1.1 unties the head. transformers >= 5 ties T5ForConditionalGeneration's head to the embedding, so
        # to_hf refuses a head that differs: start both from the embedding, then give HF's head its own Parameter.
        with torch.no_grad():
            ours.lm_head.weight.copy_(ours.word.weight)
        hf = to_hf(ours)
        if hf.lm_head.weight is hf.shared.weight:
            hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, ours.config.vocab_size, (batch, source), generator=g)
    labels = torch.randint(1, ours.config.vocab_size, (batch, target), generator=g)

    def mine(model):  # the per-token loss [b, t], averaged as transformers does
        return model(ids, labels=labels).sum() / (labels != -100).sum()

    def theirs(model):
        return model(input_ids=ids, labels=labels).loss

    _check_same_function(name, dtype, ours, hf, ids, labels, mine)
    fns = {"megacore": optimizer_step(ours, mine), "hf": optimizer_step(hf, theirs)}
    if compile_:
        torch._dynamo.reset()
        ours_c, hf_c = torch.compile(ours), torch.compile(hf)
        fns["megacore_compile"] = optimizer_step(ours, lambda _: mine(ours_c))
        fns["hf_compile"] = optimizer_step(hf, lambda _: theirs(hf_c))
    return fns


def _check_same_function(name: str, dtype: torch.dtype, ours: torch.nn.Module, hf: torch.nn.Module,
                         ids: torch.Tensor, labels: torch.Tensor, mine: Callable) -> None:
    """Step 0 in eval mode (no dropout): megacore's logits and loss (``mine``) against transformers'; RuntimeError
    beyond ``STEP0_TOLERANCE``. Leaves both models in train mode."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, labels=labels)
        logits = ours(ids, decoder_input_ids=ours.shift_right(labels))  # [b, t, vocab]
        loss, hf_loss = float(mine(ours)), float(theirs.loss)
    ours.train()
    hf.train()
    hf_logits = theirs.logits.float()
    logits_diff = float((logits.float() - hf_logits).abs().max()) / float(hf_logits.std())
    logits_tol, loss_rtol = STEP0_TOLERANCE[dtype]
    if logits_diff > logits_tol or abs(loss - hf_loss) > loss_rtol * abs(hf_loss):
        raise RuntimeError(
            f"megacore bench model: {name} ({str(dtype).removeprefix('torch.')}) differs from transformers on the same "
            f"weights at step 0: logits by up to {logits_diff:.3g} of their std (tolerance {logits_tol}), loss "
            f"{loss:.6f} vs {hf_loss:.6f} (relative tolerance {loss_rtol})")


HEADER = ("| model | batch x seq | dtype | megacore tok/s | HF tok/s | megacore compile tok/s | HF compile tok/s "
          "| vs HF | vs HF compile |\n|---|---|---|---|---|---|---|---|---|")


def run(models, dtypes, quick: bool, compile_: bool, reps: int, source_len: int | None = None,
        target_len: int | None = None) -> list[dict]:
    rows = []
    for name in models:
        batch, *lengths = (QUICK_SHAPES if quick else SHAPES)[name]
        if name.startswith("t5"):
            lengths = [source_len or lengths[0], target_len or lengths[1]]
        shape = f"{batch} x {lengths[0]}" if len(lengths) == 1 else f"{batch} x ({lengths[0]} + {lengths[1]})"
        for dtype_name in dtypes:
            times = _time(_steps(name, DTYPES[dtype_name], batch, tuple(lengths), compile_), reps, min_time=1.0)
            tokens = batch * sum(lengths)  # T5: source + target tokens
            row = dict(model=name, shape=shape, dtype=dtype_name,
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
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny batches, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--source-len", type=int, default=None,
                        help="T5: encoder tokens per sequence (default 128; --quick 32)")
    parser.add_argument("--target-len", type=int, default=None,
                        help="T5: decoder tokens per sequence (default 32; --quick 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core this process may run on)")
    args = parser.parse_args(argv)
    for option, value in (("--source-len", args.source_len), ("--target-len", args.target_len),
                          ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{option} is {value}, expected a positive number")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("the model benchmark compares with Hugging Face: pip install transformers")
    torch.set_num_threads(args.threads or available_cores())
    print("# megacore model benchmark (training step: forward + backward; T5 also AdamW) — "
          f"{describe_machine('cpu')}")
    print(HEADER, flush=True)
    run(args.models, args.dtypes, args.quick, not args.no_compile, args.reps, args.source_len, args.target_len)
    print("\nvs HF: HF eager time / megacore eager time; vs HF compile: HF compiled / megacore compiled. "
          "T5: batch x (source + target); its tok/s count both.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
