"""Every fused op on each device present against the same op on CPU, from the same inputs: forward outputs
and the gradients of every input. The op tests compare each device with a float64 reference; this file pins
that the CPU and CUDA kernels, which share their element-wise math (cpp/kernels/<family>.h), also agree with
each other — and that the dropout mask, a function of (seed, element index), is the same on both.

On a CPU-only machine the "cpu" case compares CPU with CPU, so the harness itself runs everywhere."""

from __future__ import annotations

import pytest
import torch

from megacore import ops

# Relative to the largest magnitude of the CPU result: the devices round sums in a different order and
# use different exp/erf implementations (a few units of fp32), and may round a bf16/fp16 output the other
# way (one unit of the dtype).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(dtype, *shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _cases():
    def gelu(dtype, approximate):
        x, b = _inputs(dtype, (7, 3, 37), (37,))
        return [x, b], lambda x, b: ops.bias_gelu(x, b, approximate)

    def relu(dtype):
        x, b = _inputs(dtype, (7, 3, 37), (37,))
        return [x, b], ops.bias_relu

    def gated(dtype, activation):
        x, b = _inputs(dtype, (7, 3, 2 * 37), (2 * 37,))
        return [x, b], lambda x, b: ops.bias_gated(x, b, activation)

    def dropout(dtype):
        x, b, r = _inputs(dtype, (5, 2, 67), (67,), (5, 2, 67))
        return [x, b, r], lambda x, b, r: ops.bias_dropout_add(x, b, r, 0.3, generator=torch.Generator().manual_seed(9))

    def layer_norm(dtype):
        x, w, b = _inputs(dtype, (6, 4, 45), (45,), (45,))
        return [x, w, b], lambda x, w, b: ops.layer_norm(x, w, b, 1e-5)

    def rms_norm(dtype):
        x, w = _inputs(dtype, (6, 4, 45), (45,))
        return [x, w], lambda x, w: ops.rms_norm(x, w, 1e-6)

    def masked_softmax(dtype):
        (s,) = _inputs(dtype, (2, 3, 9, 21))
        mask = torch.rand(2, 1, 9, 21, generator=torch.Generator().manual_seed(3)) < 0.3
        mask[0, 0, 4] = True  # a fully masked row: zeros on every device
        return [s], lambda s: ops.scaled_masked_softmax(s, mask.to(s.device), 0.7)

    def causal_softmax(dtype, window):
        (s,) = _inputs(dtype, (2, 3, 9, 21))
        return [s], lambda s: ops.scaled_causal_softmax(s, 0.7, window)

    def bias_softmax(dtype, bias_shape, causal, window):
        s, bias = _inputs(dtype, (2, 3, 9, 21), bias_shape)
        mask = torch.rand(2, 1, 9, 21, generator=torch.Generator().manual_seed(3)) < 0.3
        mask[0, 0, 4] = True  # a fully masked row: zeros on every device
        return [s, bias], lambda s, b: ops.scaled_bias_softmax(s, b, mask.to(s.device), 0.7, causal, window)

    def rotary(dtype):
        (x,) = _inputs(dtype, (11, 2, 3, 16))
        cos, sin = ops.rotary_tables(11, 12, dtype=dtype)
        return [x], lambda x: ops.apply_rotary_emb(x, cos.to(x.device), sin.to(x.device))

    def cross_entropy(dtype):
        (logits,) = _inputs(dtype, (13, 301))
        target = torch.randint(0, 301, (13,), generator=torch.Generator().manual_seed(4))
        target[5] = -100
        return [logits], lambda z: ops.cross_entropy(z, target.to(z.device))

    return {
        "bias_gelu-tanh": lambda d: gelu(d, "tanh"),
        "bias_gelu-erf": lambda d: gelu(d, "none"),
        "bias_relu": relu,
        "bias_gated-geglu": lambda d: gated(d, "geglu"),
        "bias_gated-geglu_erf": lambda d: gated(d, "geglu_erf"),
        "bias_gated-swiglu": lambda d: gated(d, "swiglu"),
        "bias_gated-reglu": lambda d: gated(d, "reglu"),
        "bias_dropout_add": dropout,
        "layer_norm": layer_norm,
        "rms_norm": rms_norm,
        "scaled_masked_softmax": masked_softmax,
        "scaled_causal_softmax": lambda d: causal_softmax(d, None),
        "scaled_causal_softmax-window": lambda d: causal_softmax(d, 4),
        "scaled_bias_softmax": lambda d: bias_softmax(d, (1, 3, 9, 21), False, None),
        "scaled_bias_softmax-alibi-window": lambda d: bias_softmax(d, (1, 3, 1, 21), True, 4),
        "apply_rotary_emb": rotary,
        "cross_entropy": cross_entropy,
    }


CASES = _cases()


def _run(case, dtype, device):
    """The op's output and every input's gradient (for a fixed random upstream gradient), on CPU."""
    tensors, fn = CASES[case](dtype)
    leaves = [t.to(device).requires_grad_() for t in tensors]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype).to(device)
    out.backward(grad_out)
    return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_device_computes_what_the_cpu_computes(case, dtype, device):
    expected = _run(case, dtype, "cpu")
    got = _run(case, dtype, device)
    names = ["output"] + [f"grad of input {i}" for i in range(len(got) - 1)]
    for name, a, e in zip(names, got, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{case} {name}: {a.dtype}{tuple(a.shape)}"
        scale = max(e.double().abs().max().item(), 1e-6)
        torch.testing.assert_close(a.double(), e.double(), atol=TOLERANCE[dtype] * scale, rtol=0,
                                   msg=lambda m: f"{case} {name} on {device}: {m}")
    if case == "bias_dropout_add":  # the same keep mask on both devices: dropped elements are exact zeros
        x_grad_cpu, x_grad_dev = expected[1], got[1]
        assert torch.equal(x_grad_dev == 0, x_grad_cpu == 0), "the dropout masks differ between devices"
    if case in ("scaled_masked_softmax", "scaled_bias_softmax"):
        assert (got[0][0, 0, 4] == 0).all(), "a fully masked row must give zeros"


def _nan_cases():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1, 2, 3, 7, generator=g)
    scores[0, 1, 1, 3] = float("nan")  # one NaN score in one row
    logits = torch.randn(3, 11, generator=g)
    logits[1, 4] = float("nan")
    x = torch.randn(3, 9, generator=g)
    x[2, 0] = float("nan")
    return {
        "scaled_masked_softmax": (scores, lambda s: ops.scaled_masked_softmax(s, None, 1.0)),
        "scaled_causal_softmax": (scores, lambda s: ops.scaled_causal_softmax(s, 1.0)),
        "cross_entropy": (logits, lambda z: ops.cross_entropy(z, torch.tensor([1, 2, 3], device=z.device))),
        "layer_norm": (x, lambda t: ops.layer_norm(t, None, None, 1e-5)),
        "rms_norm": (x, lambda t: ops.rms_norm(t, None, 1e-6)),
    }


@pytest.mark.parametrize("case", sorted(_nan_cases()))
def test_a_nan_input_poisons_the_same_elements_on_each_device(case, device):
    """A NaN spreads through its row's reductions (max, sum, mean) on every device alike: the same elements
    come out NaN, the others agree. (A max that skipped NaN on one device would give that row numbers.)"""
    t, fn = _nan_cases()[case]
    expected, got = fn(t), fn(t.to(device)).cpu()
    assert torch.isnan(expected).any(), "the case must produce a NaN"
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{case}: NaN elements differ on {device}"
    keep = ~torch.isnan(expected)
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-5, rtol=2e-5)
