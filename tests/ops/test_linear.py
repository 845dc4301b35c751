"""megacore.ops.linear (the skinny-linear CPU kernel for 1-16 rows, ATen's linear otherwise) against a float64
x @ w^T + b, and its autograd, fake kernel and compile."""

import math

import pytest
import torch

import megacore
from megacore.ops import SKINNY_LINEAR_MAX_ROWS, linear
from tests.ops.utils import as_double_leaf, assert_close, compile_fullgraph, device_params, dtype_params, leaf


def _check(x, w, b, grad_scale=1.0):
    """x, w, b: leaves (b may be None; x possibly a view of one) of the tested dtype."""
    y = linear(x, w, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    xd, wd, bd = as_double_leaf(x), as_double_leaf(w), as_double_leaf(b)
    yd = xd @ wd.t() + (bd if bd is not None else 0)
    yd.backward(grad.double())
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    # a dot product of `in` rounded terms: the error grows like sqrt(in)
    scale = max(1.0, math.sqrt(x.shape[-1]) / 4)
    assert_close(y, yd, x.dtype, scale=scale, msg="output")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    assert_close(x.grad, xd.grad, x.dtype, scale=max(1.0, math.sqrt(w.shape[0]) / 4),
                 msg="grad x")
    assert_close(w.grad, wd.grad, x.dtype, scale=max(1.0, math.sqrt(rows) / 4) * grad_scale, msg="grad weight")
    if b is not None:
        assert_close(b.grad, bd.grad, x.dtype, scale=max(1.0, math.sqrt(rows) / 4) * grad_scale, msg="grad bias")


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 40])
@pytest.mark.parametrize("in_out", [(19, 37), (64, 3), (100, 130), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(device, dtype, rows, in_out):
    """Rows on both sides of the kernel's range in each dtype, row chunks (8 with AVX512, 4 otherwise) with every
    remainder, feature counts that are no multiple of any vector width, output counts that are no multiple of any
    block height."""
    fan_in, fan_out = in_out
    _check(leaf((rows, fan_in), dtype, device), leaf((fan_out, fan_in), dtype, device), leaf((fan_out,), dtype, device))


@pytest.mark.isa
@device_params
@dtype_params
def test_gpt2_sizes_many_threads_and_no_bias(device, dtype):
    """Enough weight rows for the kernel's blocks to be split across threads; 3-D input as the layer's [s, b, h]."""
    x = leaf((1, 4, 768), dtype, device, scale=0.1)
    w = leaf((2304, 768), dtype, device, scale=0.1)
    _check(x, w, None)
    _check(leaf((2, 3, 1000), dtype, device, scale=0.1), leaf((515, 1000), dtype, device, scale=0.1),
           leaf((515,), dtype, device))


@device_params
@dtype_params
def test_non_contiguous_input_and_weight(device, dtype):
    xb = leaf((6, 2, 40), dtype, device)
    x = xb.transpose(0, 1)  # [2, 6, 40]: 12 rows, not contiguous
    w = leaf((9, 40), dtype, device)
    y = linear(x, w, None)
    yd = x.detach().double() @ w.detach().double().t()
    assert_close(y, yd, dtype, scale=2, msg="non-contiguous input")
    wt = leaf((40, 9), dtype, device)  # a transposed weight: ATen's linear
    y = linear(x, wt.t(), None)
    assert_close(y, x.detach().double() @ wt.detach().double(), dtype, scale=2, msg="transposed weight")


@device_params
def test_float64_gradcheck_and_empty_shapes(device):
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear(x, w), (x, w))
    # no rows, no outputs, no features
    assert linear(torch.randn(0, 5, device=device), torch.randn(4, 5, device=device)).shape == (0, 4)
    assert linear(torch.randn(3, 5, device=device), torch.randn(0, 5, device=device)).shape == (3, 0)
    y = linear(torch.randn(3, 0, device=device), torch.randn(4, 0, device=device), torch.ones(4, device=device))
    assert torch.equal(y, torch.ones(3, 4, device=device))


@device_params
def test_bias_is_added_once_and_rounded_once(device):
    """Exact small integers: x @ w^T + b computed exactly in fp32 and in bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.arange(12, dtype=dtype, device=device).reshape(3, 4)
        w = torch.ones(5, 4, dtype=dtype, device=device)
        b = torch.arange(5, dtype=dtype, device=device)
        expected = x.double().sum(-1, keepdim=True) + b.double()
        assert torch.equal(linear(x, w, b).double(), expected)


def _skinny_calls(x, w) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        linear(x, w)
    return sum(e.name == "megacore.linear.skinny" for e in prof.events())


@pytest.mark.parametrize("dtype,first,last", [(torch.float32, 4, 15), (torch.bfloat16, 1, 4), (torch.float16, 1, 8),
                                               (torch.float64, None, None)], ids=str)
def test_the_kernel_serves_the_rows_where_it_was_measured_faster(dtype, first, last):
    """ops/linear.cpp's skinny_rows: fp32 4-15 rows, bf16 1-4, fp16 1-8; fp64, other rows and a non-contiguous
    weight are ATen's."""
    w = torch.randn(6, 8, dtype=dtype)
    for rows in range(1, 18):
        expected = first is not None and first <= rows <= last
        assert _skinny_calls(torch.randn(rows, 8, dtype=dtype), w) == expected, rows
    if first is not None:
        assert _skinny_calls(torch.randn(1, 1, last, 8, dtype=dtype), w) == 1  # rows in 3 dims
        assert _skinny_calls(torch.randn(last, 8, dtype=dtype), torch.randn(8, 6, dtype=dtype).t()) == 0


def test_the_row_limit_is_the_extensions():
    assert SKINNY_LINEAR_MAX_ROWS == megacore._C.SKINNY_LINEAR_MAX_ROWS == 16


@device_params
def test_opcheck_and_compile(device):
    x = torch.randn(8, 24, device=device, requires_grad=True)
    w = torch.randn(10, 24, device=device, requires_grad=True)
    b = torch.randn(10, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.megacore.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.megacore.linear.default, (x, w, None))
    fn = compile_fullgraph(lambda x, w, b: torch.relu(linear(x, w, b)) * 2)
    torch.testing.assert_close(fn(x, w, b), torch.relu(linear(x, w, b)) * 2)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"megacore\.linear: weight has shape \[5, 7\], expected \[out_features, 8\] "
                                         r"\(in_features = input\.size\(-1\)\)"):
        linear(x, torch.randn(5, 7, device=device))
    with pytest.raises(ValueError, match=r"megacore\.linear: weight has shape \[8\], expected"):
        linear(x, torch.randn(8, device=device))
    with pytest.raises(ValueError, match=r"megacore\.linear: bias has shape \[4\], expected \[5\] "
                                         r"\(out_features = weight\.size\(0\)\)"):
        linear(x, torch.randn(5, 8, device=device), torch.randn(4, device=device))
    with pytest.raises(TypeError, match=r"megacore\.linear: weight has dtype .*BFloat16.*expected Float"):
        linear(x, torch.randn(5, 8, device=device, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"megacore\.linear: input has dtype Long"):
        linear(torch.ones(4, 8, dtype=torch.long, device=device), torch.randn(5, 8, device=device))
    with pytest.raises(ValueError, match=r"megacore\.linear: input has 0 dims"):
        linear(torch.tensor(1.0, device=device), torch.randn(5, 1, device=device))
