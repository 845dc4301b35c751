"""megacore.ops.bias_gelu against F.gelu(x + bias)."""

import pytest
import torch

from megacore.ops import bias_gelu, reference
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)

HIDDEN = [1, 3, 127, 1000, 4097]


def _check(shape, dtype, device, approximate, with_bias=True, noncontig=False):
    x = leaf(shape, dtype, device, scale=2.0)
    if noncontig:
        x = leaf(shape[:-1] + (2 * shape[-1],), dtype, device, scale=2.0)[..., ::2].detach().requires_grad_()
    bias = leaf((shape[-1],), dtype, device) if with_bias else None
    y = bias_gelu(x, bias, approximate)
    grad = torch.randn_like(y)
    y.backward(grad)

    xd, bd = as_double_leaf(x), as_double_leaf(bias)
    yd = reference.bias_gelu(xd, bd, approximate)
    yd.backward(grad.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yd, dtype, msg="output")
    assert_close(x.grad, xd.grad, dtype, msg="grad x")
    if with_bias:
        rows = x.numel() // max(shape[-1], 1)
        assert_close(bias.grad, bd.grad, dtype, scale=max(1.0, rows**0.5), msg="grad bias")


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_matches_reference_over_hidden_sizes(device, dtype, hidden, approximate):
    _check((5, 3, hidden), dtype, device, approximate)


@pytest.mark.isa
@device_params
@dtype_params
def test_without_bias_and_non_contiguous_input(device, dtype):
    _check((7, 333), dtype, device, "tanh", with_bias=False)
    _check((7, 333), dtype, device, "none", noncontig=True)


@device_params
def test_large_row_and_many_rows(device):
    _check((2, 65536 + 3), torch.float32, device, "tanh")
    _check((20000, 8), torch.float32, device, "none")


@device_params
def test_empty_batch(device):
    x = torch.empty(0, 64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    y = bias_gelu(x, b)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(b.grad, torch.zeros(64, device=device))


@device_params
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_float64(device, approximate):
    x = torch.randn(4, 19, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(19, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: bias_gelu(x, b, approximate), (x, b))


@device_params
def test_opcheck(device):
    x = torch.randn(6, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.megacore.bias_gelu.default, (x, b, "tanh"))
    torch.library.opcheck(torch.ops.megacore.bias_gelu.default, (x, None, "none"))
    g = torch.randn(6, 33, device=device)
    torch.library.opcheck(torch.ops.megacore.bias_gelu_backward.default, (g, x.detach(), b.detach(), "tanh"))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, b):
        return bias_gelu(x * 2, b).sum()

    x = torch.randn(8, 65, device=device, requires_grad=True)
    b = torch.randn(65, device=device, requires_grad=True)
    gx, gb = torch.autograd.grad(compile_fullgraph(f)(x, b), (x, b))
    ex, eb = torch.autograd.grad(f(x, b), (x, b))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gb, eb)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"megacore\.bias_gelu: bias has shape \[7\], expected \[8\]"):
        bias_gelu(x, torch.randn(7, device=device))
    with pytest.raises(ValueError, match=r"megacore\.bias_gelu: bias has shape \[1, 8\]"):
        bias_gelu(x, torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match=r"megacore\.bias_gelu: bias has dtype .*Half.*expected Float"):
        bias_gelu(x, torch.randn(8, device=device, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"megacore\.bias_gelu: x has dtype Long"):
        bias_gelu(torch.ones(4, 8, dtype=torch.long, device=device), None)
    with pytest.raises(ValueError, match=r"megacore\.bias_gelu: approximate is 'erf'"):
        bias_gelu(x, None, "erf")
    with pytest.raises(ValueError, match=r"megacore\.bias_gelu: x has 0 dims"):
        bias_gelu(torch.tensor(1.0, device=device), None)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"bias is on cuda"):
            bias_gelu(x, torch.randn(8, device="cuda"))
