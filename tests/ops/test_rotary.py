"""megacore.ops.apply_rotary_emb against the rotate-half reference."""

import pytest
import torch

from megacore.ops import apply_rotary_emb, reference, rotary_tables
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)


def _tables(seq, rot, device, dtype=torch.float32):
    return rotary_tables(seq, rot, device=device, dtype=dtype)


def _check(x, cos, sin):
    """x: a leaf (possibly a non-contiguous view of one) of the tested dtype."""
    y = apply_rotary_emb(x, cos, sin)
    grad = torch.randn_like(y)
    y.backward(grad)

    xd = as_double_leaf(x)
    yd = reference.apply_rotary_emb(xd, cos.double(), sin.double())
    yd.backward(grad.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, yd, x.dtype, msg="output")
    assert_close(x.grad, xd.grad, x.dtype, msg="grad x")
    # Features past rotary_dim pass through unchanged, bit for bit.
    r = cos.shape[-1]
    assert torch.equal(y[..., r:], x[..., r:])


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize(
    "shape,rot",
    [
        ((11, 2, 3, 64), 64),  # rotary_dim == head_dim
        ((11, 2, 3, 64), 32),  # partial rotary
        ((9, 2, 5, 33), 8),  # odd head_dim, even rotary_dim
        ((13, 2, 2, 130), 130),  # half = 65, not a multiple of any vector width
        ((17, 40), 40),  # [seq, dim]
        ((5, 6), 2),
    ],
)
def test_matches_reference(device, dtype, shape, rot):
    x = leaf(shape, dtype, device)
    cos, sin = _tables(shape[0], rot, device)
    _check(x, cos, sin)


@pytest.mark.isa
@device_params
@dtype_params
def test_tables_in_x_dtype_and_non_contiguous_input(device, dtype):
    # batch-first [batch, seq, heads, dim] passed as seq-first via transpose: non-contiguous.
    xb = leaf((3, 10, 4, 48), dtype, device)
    x = xb.transpose(0, 1)
    cos, sin = _tables(10, 32, device, dtype=dtype)
    y = apply_rotary_emb(x, cos, sin)
    grad = torch.randn_like(y)
    y.backward(grad)
    xbd = as_double_leaf(xb)
    yd = reference.apply_rotary_emb(xbd.transpose(0, 1), cos.double(), sin.double())
    yd.backward(grad.double())
    assert_close(y, yd, dtype, msg="output")
    assert_close(xb.grad, xbd.grad, dtype, msg="grad x")


@device_params
def test_bf16_input_with_fp32_tables(device):
    x = leaf((2048 // 16, 2, 4, 64), torch.bfloat16, device)
    cos, sin = _tables(x.shape[0], 64, device)
    assert cos.dtype == torch.float32
    _check(x, cos, sin)


@device_params
def test_large_rows(device):
    x = leaf((3, 2, 4096 + 6), torch.float32, device)
    cos, sin = _tables(3, 4096, device)
    _check(x, cos, sin)


@device_params
def test_empty(device):
    for shape in [(0, 4, 8), (5, 0, 8)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        cos, sin = _tables(shape[0], 8, device)
        y = apply_rotary_emb(x, cos, sin)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape


@device_params
def test_gradcheck_float64(device):
    x = torch.randn(5, 2, 3, 10, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = _tables(5, 6, device, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: apply_rotary_emb(x, cos, sin), (x,))


@device_params
def test_opcheck(device):
    x = torch.randn(6, 2, 3, 16, device=device, requires_grad=True)
    cos, sin = _tables(6, 12, device)
    torch.library.opcheck(torch.ops.megacore.apply_rotary_emb.default, (x, cos, sin))
    xb = x.detach().bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.megacore.apply_rotary_emb.default, (xb, cos, sin))
    g = torch.randn(6, 2, 3, 16, device=device)
    torch.library.opcheck(torch.ops.megacore.apply_rotary_emb_backward.default, (g, cos, sin))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, cos, sin):
        return (apply_rotary_emb(x * 2, cos, sin) * x).sum()

    x = torch.randn(8, 2, 3, 20, device=device, requires_grad=True)
    cos, sin = _tables(8, 16, device)
    (gx,) = torch.autograd.grad(compile_fullgraph(f)(x, cos, sin), (x,))
    (ex,) = torch.autograd.grad(f(x, cos, sin), (x,))
    torch.testing.assert_close(gx, ex)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 2, 8, device=device)
    cos, sin = _tables(4, 8, device)
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: x has 1 dims \(shape \[8\]\), expected at least 2"):
        apply_rotary_emb(torch.randn(8, device=device), cos[:1], sin[:1])
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: cos has shape \[3, 8\], expected \[4, rotary_dim\]"):
        apply_rotary_emb(x, cos[:3], sin[:3])
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: cos has shape \[4, 1, 8\]"):
        apply_rotary_emb(x, cos[:, None], sin[:, None])
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: sin has shape \[4, 6\], expected \[4, 8\]"):
        apply_rotary_emb(x, cos, sin[:, :6])
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: rotary_dim \(cos.size\(1\)\) is 5, expected a positive even"):
        apply_rotary_emb(x, cos[:, :5], sin[:, :5])
    c16, s16 = _tables(4, 16, device)
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: rotary_dim \(cos.size\(1\)\) is 16, .*head_dim \(8\)"):
        apply_rotary_emb(x, c16, s16)
    with pytest.raises(TypeError, match=r"megacore\.apply_rotary_emb: cos has dtype Half, expected Float or Float"):
        apply_rotary_emb(x, cos.half(), sin)
    with pytest.raises(TypeError, match=r"megacore\.apply_rotary_emb: x has dtype Long"):
        apply_rotary_emb(x.long(), cos, sin)
    with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb_backward: grad_out has 1 dims"):
        torch.ops.megacore.apply_rotary_emb_backward(torch.randn(8, device=device), cos, sin)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"megacore\.apply_rotary_emb: cos is on cuda:0, expected cpu"):
            apply_rotary_emb(x, cos.cuda(), sin.cuda())
