"""The C++ transformer layer marks its phases (cpp/common/profiling.h): torch.profiler on CPU sees them
in order, forward and backward, each holding the fused ops it runs. Nsight sees the same names as NVTX
ranges in a CUDA build (docs/profiling.md)."""

from __future__ import annotations

import pytest
import torch

from megacore.transformer import TransformerConfig, TransformerLayer

FORWARD = "megacore.transformer_layer."
BACKWARD = "megacore.transformer_layer_backward."


def _events(pre_norm: bool):
    torch.manual_seed(0)
    config = TransformerConfig(hidden_size=48, num_attention_heads=4, ffn_hidden_size=72, pre_norm=pre_norm,
                               hidden_dropout=0.1, attention_dropout=0.1)
    layer = TransformerLayer(config)
    x = torch.randn(7, 2, 48, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    return sorted(prof.events(), key=lambda e: e.time_range.start)


def _phases(events, prefix: str) -> list[str]:
    return [e.name.removeprefix(prefix) for e in events if e.name.startswith(prefix)]


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
def test_layer_phases_show_in_torch_profiler_in_order(pre_norm):
    events = _events(pre_norm)
    if pre_norm:
        forward = ["attention_norm", "qkv", "attention", "proj", "residual", "mlp_norm", "mlp", "residual"]
    else:  # post-LN normalizes after each residual, with the attention norm first
        forward = ["qkv", "attention", "proj", "residual", "attention_norm", "mlp", "residual", "mlp_norm"]
    assert _phases(events, FORWARD) == forward
    assert _phases(events, BACKWARD) == forward[::-1]


def test_each_phase_holds_its_fused_ops():
    events = _events(pre_norm=True)

    def inside(phase: str, op: str) -> bool:
        return any(e.name == op and outer.time_range.start <= e.time_range.start
                   and e.time_range.end <= outer.time_range.end
                   for outer in events if outer.name == phase for e in events)

    assert inside(FORWARD + "mlp", "megacore::bias_gelu")
    assert inside(FORWARD + "attention_norm", "megacore::layer_norm")
    assert inside(FORWARD + "attention", "megacore::scaled_causal_softmax")
    assert inside(FORWARD + "residual", "megacore::bias_dropout_add")
    assert not inside(FORWARD + "proj", "megacore::bias_dropout_add")
    assert inside(BACKWARD + "mlp", "megacore::bias_gelu_backward")
    assert inside(BACKWARD + "attention", "megacore::scaled_softmax_backward")
    assert not inside(FORWARD + "qkv", "megacore::bias_gelu")
