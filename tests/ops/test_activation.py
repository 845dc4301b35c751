"""megacore.ops.bias_relu against F.relu(x + bias), and megacore.ops.bias_gated (GeGLU, SwiGLU, ReGLU)
against act(gate) * linear in plain PyTorch. bias_gelu, the family's first op, is tests/ops/test_gelu.py's."""

import pytest
import torch

from megacore.ops import bias_gated, bias_relu, reference
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)

HIDDEN = [1, 7, 33, 1000, 4097]  # bias_relu's last dim
GATED_N = [1, 7, 33, 1001]  # bias_gated's output width n (x's last dim is 2n)
ACTIVATIONS = ["geglu", "geglu_erf", "swiglu", "reglu"]
activation_params = pytest.mark.parametrize("activation", ACTIVATIONS)


def _check(op, ref, shape, dtype, device, *args, with_bias=True, noncontig=False):
    """op(x, bias, *args) and its gradients against ref's in float64, from the same rounded inputs."""
    x = leaf(shape, dtype, device, scale=2.0)
    if noncontig:  # every other column of a wider tensor
        x = leaf(shape[:-1] + (2 * shape[-1],), dtype, device, scale=2.0)[..., ::2].detach().requires_grad_()
        assert not x.is_contiguous()
    bias = leaf((shape[-1],), dtype, device) if with_bias else None
    y = op(x, bias, *args)
    grad = torch.randn_like(y)
    y.backward(grad)

    xd, bd = as_double_leaf(x), as_double_leaf(bias)
    yd = ref(xd, bd, *args)
    yd.backward(grad.double())

    assert y.dtype == dtype and y.shape == yd.shape
    assert_close(y, yd, dtype, msg="output")
    assert_close(x.grad, xd.grad, dtype, msg="grad x")
    if with_bias:
        rows = x.numel() // max(shape[-1], 1)
        assert_close(bias.grad, bd.grad, dtype, scale=max(1.0, rows**0.5), msg="grad bias")
    else:
        assert bias is None


def _check_relu(shape, dtype, device, **kwargs):
    _check(bias_relu, reference.bias_relu, shape, dtype, device, **kwargs)


def _check_gated(shape, dtype, device, activation, **kwargs):
    _check(bias_gated, reference.bias_gated, shape, dtype, device, activation, **kwargs)


# ---- bias_relu -------------------------------------------------------------------------------------------


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("hidden", HIDDEN)
def test_bias_relu_matches_reference_over_hidden_sizes(device, dtype, hidden):
    _check_relu((5, 3, hidden), dtype, device)


@pytest.mark.isa
@device_params
@dtype_params
def test_bias_relu_without_bias_and_non_contiguous_input(device, dtype):
    _check_relu((7, 333), dtype, device, with_bias=False)
    _check_relu((7, 333), dtype, device, noncontig=True)


@device_params
def test_bias_relu_float64_and_large_row_and_many_rows(device):
    _check_relu((3, 65), torch.float64, device)
    _check_relu((2, 65536 + 3), torch.float32, device)
    _check_relu((20000, 8), torch.float32, device)


@device_params
def test_bias_relu_gradient_is_zero_where_the_input_is_zero_or_below(device):
    """As torch.relu: the gradient passes only where x + bias > 0 (0 exactly gets none)."""
    x = torch.tensor([[-1.0, 0.0, 2.0, -0.5]], device=device, requires_grad=True)
    b = torch.tensor([0.0, 0.0, 0.0, 0.5], device=device, requires_grad=True)
    y = bias_relu(x, b)
    y.backward(torch.full_like(y, 3.0))
    assert y.tolist() == [[0.0, 0.0, 2.0, 0.0]]
    assert x.grad.tolist() == [[0.0, 0.0, 3.0, 0.0]]
    assert b.grad.tolist() == [0.0, 0.0, 3.0, 0.0]


# ---- bias_gated ------------------------------------------------------------------------------------------


@pytest.mark.isa
@device_params
@dtype_params
@activation_params
@pytest.mark.parametrize("n", GATED_N)
def test_bias_gated_matches_reference_over_sizes(device, dtype, activation, n):
    _check_gated((5, 3, 2 * n), dtype, device, activation)


@pytest.mark.isa
@device_params
@dtype_params
@activation_params
def test_bias_gated_without_bias_and_non_contiguous_input(device, dtype, activation):
    _check_gated((7, 2 * 333), dtype, device, activation, with_bias=False)
    _check_gated((7, 2 * 333), dtype, device, activation, noncontig=True)


@device_params
@activation_params
def test_bias_gated_float64_and_large_row_and_many_rows(device, activation):
    _check_gated((3, 2 * 65), torch.float64, device, activation)
    _check_gated((2, 2 * (65536 + 3)), torch.float32, device, activation)
    _check_gated((20000, 2 * 4), torch.float32, device, activation)


@device_params
def test_bias_gated_gates_with_the_first_half(device):
    """y = act(x[..., :n]) * x[..., n:]: the gate is the first half, as in Megatron and Hugging Face."""
    gate = torch.tensor([[-30.0, 0.0, 30.0]], device=device)
    linear = torch.tensor([[5.0, 6.0, 7.0]], device=device)
    y = bias_gated(torch.cat([gate, linear], -1), None, "reglu")
    assert y.tolist() == [[0.0, 0.0, 210.0]]
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], device=device)
    y = bias_gated(torch.cat([gate, linear], -1), bias, "swiglu")  # silu(-30) * 6 ~ -2e-11
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0, 240.0]], device=device), atol=1e-9, rtol=0)


# ---- both ------------------------------------------------------------------------------------------------


@device_params
def test_empty_batch(device):
    x = torch.empty(0, 64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    bias_relu(x, b).sum().backward()
    assert torch.equal(b.grad, torch.zeros(64, device=device))
    b.grad = None
    y = bias_gated(x, b, "geglu")
    y.sum().backward()
    assert y.shape == (0, 32)
    assert torch.equal(b.grad, torch.zeros(64, device=device))


def _away_from_zero(t):
    """Keeps ReLU's kink out of reach of gradcheck's finite differences."""
    return (t + 0.1 * t.sign()).detach().requires_grad_()


@device_params
@pytest.mark.parametrize("activation", ["relu"] + ACTIVATIONS)
def test_gradcheck_float64(device, activation):
    g = torch.Generator().manual_seed(0)
    if activation == "relu":
        x = _away_from_zero(torch.randn(4, 19, dtype=torch.float64, generator=g).to(device))
        b = torch.zeros(19, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(bias_relu, (x, b))
        return
    x = _away_from_zero(torch.randn(4, 2 * 9, dtype=torch.float64, generator=g).to(device))
    b = torch.randn(2 * 9, dtype=torch.float64, generator=g).to(device).requires_grad_()
    if activation == "reglu":  # the gate's kink: keep x1 + b1 away from 0
        b = torch.zeros(2 * 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: bias_gated(x, b, activation), (x, b))


@device_params
def test_opcheck(device):
    x = torch.randn(6, 34, device=device, requires_grad=True)
    b = torch.randn(34, device=device, requires_grad=True)
    g = torch.randn(6, 34, device=device)
    torch.library.opcheck(torch.ops.megacore.bias_relu.default, (x, b))
    torch.library.opcheck(torch.ops.megacore.bias_relu.default, (x, None))
    torch.library.opcheck(torch.ops.megacore.bias_relu_backward.default, (g, x.detach(), b.detach()))
    torch.library.opcheck(torch.ops.megacore.bias_relu_backward.default, (g, x.detach(), None))
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.megacore.bias_gated.default, (x, b, activation))
    torch.library.opcheck(torch.ops.megacore.bias_gated.default, (x, None, "swiglu"))
    gg = torch.randn(6, 17, device=device)
    torch.library.opcheck(torch.ops.megacore.bias_gated_backward.default, (gg, x.detach(), b.detach(), "geglu"))
    torch.library.opcheck(torch.ops.megacore.bias_gated_backward.default, (gg, x.detach(), None, "swiglu"))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, b, xg, bg):
        return bias_relu(x * 2, b).sum() + (bias_gated(xg * 2, bg, "swiglu") * 3).sum()

    args = [torch.randn(8, 65, device=device, requires_grad=True), torch.randn(65, device=device, requires_grad=True),
            torch.randn(8, 66, device=device, requires_grad=True), torch.randn(66, device=device, requires_grad=True)]
    got = torch.autograd.grad(compile_fullgraph(f)(*args), args)
    expected = torch.autograd.grad(f(*args), args)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"megacore\.bias_relu: bias has shape \[7\], expected \[8\] "
                                         r"\(the input's last dim\)"):
        bias_relu(x, torch.randn(7, device=device))
    with pytest.raises(TypeError, match=r"megacore\.bias_relu: bias has dtype .*Half.*expected Float"):
        bias_relu(x, torch.randn(8, device=device, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"megacore\.bias_relu: x has dtype Long"):
        bias_relu(torch.ones(4, 8, dtype=torch.long, device=device))
    with pytest.raises(ValueError,
                       match=r"megacore\.bias_relu_backward: grad_out has shape \[4, 7\], expected \[4, 8\]"):
        torch.ops.megacore.bias_relu_backward(torch.randn(4, 7, device=device), x, None)

    with pytest.raises(ValueError, match=r"megacore\.bias_gated: x has shape \[4, 7\], expected an even last dim"):
        bias_gated(torch.randn(4, 7, device=device))
    with pytest.raises(ValueError, match=r"megacore\.bias_gated: bias has shape \[4\], expected \[8\]"):
        bias_gated(x, torch.randn(4, device=device))
    with pytest.raises(TypeError, match=r"megacore\.bias_gated: bias has dtype .*BFloat16.*expected Float"):
        bias_gated(x, torch.randn(8, device=device, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"megacore\.bias_gated: activation is 'gelu', expected one of "
                                         r"'geglu', 'geglu_erf', 'swiglu', 'reglu'"):
        bias_gated(x, None, "gelu")
    with pytest.raises(ValueError, match=r"megacore\.bias_gated: x has 0 dims"):
        bias_gated(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"megacore\.bias_gated_backward: grad_out has shape \[4, 8\], "
                                         r"expected \[4, 4\] \(the shape of x with its last dim halved\)"):
        torch.ops.megacore.bias_gated_backward(x, x, None, "swiglu")
    with pytest.raises(TypeError, match=r"megacore\.bias_gated_backward: grad_out has dtype Double"):
        torch.ops.megacore.bias_gated_backward(torch.randn(4, 4, device=device, dtype=torch.float64), x, None, "reglu")
