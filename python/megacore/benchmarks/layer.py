"""Transformer-layer benchmark: forward + backward of one GPT (pre-LN, causal) layer, four ways, same run:

* ``megacore``: ``megacore.transformer.TransformerLayer``, forward and backward in C++;
* ``reference``: the same block composed in Python from ``megacore.ops`` (autograd does the backward);
* ``eager``: the block as PyTorch users write it: ``nn.LayerNorm``, ``nn.Linear``,
  ``F.scaled_dot_product_attention(is_causal=True)``, ``nn.GELU``, ``nn.Dropout``;
* ``compile``: ``torch.compile`` of that eager block.

Same sizes, dtype, dropout rates and parameters for all; inputs ``[seq, batch, hidden]`` for megacore and
the reference, ``[batch, seq, hidden]`` for the eager block (its usual layout). Reports milliseconds per
forward+backward (median, variants interleaved) and megacore's speed-up over each.

    python -m megacore.benchmarks layer [--hidden 256 1024] [--dtypes float32 bfloat16] [--quick]
    megacore bench layer ...          (the same)
    python benchmarks/layer.py ...    (the same)
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import megacore
from megacore.benchmarks.ops import DTYPES, _sync, _time, describe_machine
from megacore.transformer import TransformerConfig, TransformerLayer
from megacore.transformer.reference import transformer_layer_reference

# hidden -> (heads, seq, batch)
SIZES = {256: (4, 512, 8), 512: (8, 512, 4), 1024: (16, 512, 4), 2048: (16, 512, 2)}
QUICK_SIZES = {256: (4, 64, 2), 512: (8, 64, 2), 1024: (16, 64, 1), 2048: (16, 64, 1)}


class EagerBlock(nn.Module):
    """A pre-LN GPT block written the usual PyTorch way, holding the same weights as a megacore layer."""

    def __init__(self, layer: TransformerLayer):
        super().__init__()
        c = layer.config
        h, f = c.hidden_size, c.ffn_hidden_size
        kw = dict(dtype=c.params_dtype)
        self.heads, self.p_attn = c.num_attention_heads, c.attention_dropout
        self.ln1, self.ln2 = nn.LayerNorm(h, eps=c.norm_epsilon, **kw), nn.LayerNorm(h, eps=c.norm_epsilon, **kw)
        self.qkv, self.proj = nn.Linear(h, 3 * h, **kw), nn.Linear(h, h, **kw)
        self.fc1, self.fc2 = nn.Linear(h, f, **kw), nn.Linear(f, h, **kw)
        self.act = nn.GELU(approximate="none" if c.activation == "gelu" else "tanh")
        self.drop = nn.Dropout(c.hidden_dropout)
        with torch.no_grad():
            d = c.head_dim
            # megacore's qkv rows are (head, {q, k, v}, d); the usual layout is ({q, k, v}, head, d)
            w = layer.attention.qkv.weight.view(c.num_attention_heads, 3, d, h).transpose(0, 1).reshape(3 * h, h)
            b = layer.attention.qkv.bias.view(c.num_attention_heads, 3, d).transpose(0, 1).reshape(3 * h)
            for mine, theirs in ((self.qkv.weight, w), (self.qkv.bias, b),
                                 (self.proj.weight, layer.attention.proj.weight), (self.proj.bias, layer.attention.proj.bias),
                                 (self.fc1.weight, layer.mlp.fc1.weight), (self.fc1.bias, layer.mlp.fc1.bias),
                                 (self.fc2.weight, layer.mlp.fc2.weight), (self.fc2.bias, layer.mlp.fc2.bias),
                                 (self.ln1.weight, layer.attention_norm.weight), (self.ln1.bias, layer.attention_norm.bias),
                                 (self.ln2.weight, layer.mlp_norm.weight), (self.ln2.bias, layer.mlp_norm.bias)):
                mine.copy_(theirs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [b, s, h]
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p_attn if self.training else 0.0, is_causal=True)
        x = x + self.drop(self.proj(ctx.transpose(1, 2).reshape(b, s, h)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step():
        x.grad = None
        fn(x).backward(grad)

    return step


def run(hiddens, dtypes, attention_dropouts, quick: bool, compile_: bool, reps: int, device: str) -> list[dict]:
    rows = []
    for hidden in hiddens:
        heads, seq, batch = (QUICK_SIZES if quick else SIZES)[hidden]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for p_attn in attention_dropouts:
                torch.manual_seed(0)
                config = TransformerConfig(hidden_size=hidden, num_attention_heads=heads, params_dtype=dtype,
                                           hidden_dropout=0.1, attention_dropout=p_attn)
                layer = TransformerLayer(config, device=device)
                eager = EagerBlock(layer).to(device)
                x_sbh = torch.randn(seq, batch, hidden, device=device).to(dtype).requires_grad_()
                x_bsh = x_sbh.detach().transpose(0, 1).contiguous().requires_grad_()
                g_sbh = torch.randn_like(x_sbh)
                g_bsh = g_sbh.transpose(0, 1).contiguous()
                params = layer.layer_params()

                def reference(x):
                    return transformer_layer_reference(x, params, config, seed=int(torch.randint(0, 2**62, ())))

                fns = {
                    "megacore": _fwd_bwd(layer, x_sbh, g_sbh),
                    "reference": _fwd_bwd(reference, x_sbh, g_sbh),
                    "eager": _fwd_bwd(eager, x_bsh, g_bsh),
                }
                if compile_:
                    torch._dynamo.reset()
                    fns["compile"] = _fwd_bwd(torch.compile(eager), x_bsh, g_bsh)
                times = _time(fns, reps, min_time=1.0, device=device)
                row = dict(hidden=hidden, shape=f"s{seq} b{batch} heads{heads}", dtype=dtype_name,
                           attention_dropout=p_attn, **{f"{k}_ms": 1e3 * v for k, v in times.items()})
                for other in ("reference", "eager", "compile"):
                    if other in times:
                        row[f"vs_{other}"] = times[other] / times["megacore"]
                rows.append(row)
                print(_format_row(row), flush=True)
                _sync(device)
    return rows


HEADER = (
    "| hidden | shape | dtype | attn dropout | megacore ms | reference ms | eager ms | compile ms "
    "| vs reference | vs eager | vs compile |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _format_row(r: dict) -> str:
    def ms(key):
        return f"{r[key]:.1f}" if key in r else "-"

    def ratio(key):
        return f"{r[key]:.2f}x" if key in r else "-"

    return (f"| {r['hidden']} | {r['shape']} | {r['dtype']} | {r['attention_dropout']} | {ms('megacore_ms')} | "
            f"{ms('reference_ms')} | {ms('eager_ms')} | {ms('compile_ms')} | {ratio('vs_reference')} | "
            f"{ratio('vs_eager')} | {ratio('vs_compile')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megacore bench layer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 1024], choices=sorted(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--attention-dropout", nargs="+", type=float, default=[0.1, 0.0],
                        help="attention dropout rates to run (0 lets both megacore and eager use flash attention)")
    parser.add_argument("--quick", action="store_true", help="short sequences, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not megacore.build_info()["cuda"]:
        parser.error("--device cuda needs megacore built with CUDA (see megacore info)")
    print(f"# megacore transformer-layer benchmark (forward + backward, training) — {describe_machine(args.device)}")
    print(HEADER, flush=True)
    run(args.hidden, args.dtypes, args.attention_dropout, args.quick, not args.no_compile, args.reps, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
