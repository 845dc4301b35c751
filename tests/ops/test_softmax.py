"""megacore.ops.scaled_masked_softmax / scaled_causal_softmax against softmax(scale * scores.masked_fill(mask, -inf))."""

import pytest
import torch

from megacore.ops import reference, scaled_causal_softmax, scaled_masked_softmax
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)

KEYS = [1, 3, 17, 127, 1000, 4097]
SCALE = 0.37


class _ops:  # the ops under test under the reference module's names
    scaled_masked_softmax = staticmethod(scaled_masked_softmax)
    scaled_causal_softmax = staticmethod(scaled_causal_softmax)


def _padding_mask(kind, b, sq, sk, device):
    """A bool mask (True = excluded) of the given broadcast kind, with key padding, random holes, and
    (where the shape allows) one row that excludes every key."""
    if kind is None:
        return None
    shape = {"b1qk": (b, 1, sq, sk), "b11k": (b, 1, 1, sk), "qk": (sq, sk)}[kind]
    mask = torch.rand(shape, device=device) < 0.3
    mask[..., sk - sk // 4 :] = True  # key padding at the end
    mask.reshape(-1, sk)[0] = True  # a row with every key excluded
    return mask


def _check(fn, x, dtype, grad_scale=1.0):
    """Forward and backward of fn(x) against fn(x in float64) through the reference."""
    y = fn(x, False)
    grad = torch.randn_like(y)
    y.backward(grad)
    xd = as_double_leaf(x)
    yd = fn(xd, True)
    yd.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert not y.isnan().any() and not x.grad.isnan().any()
    assert_close(y, yd, dtype, msg="output")
    assert_close(x.grad, xd.grad, dtype, scale=grad_scale, msg="grad scores")


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("sk", KEYS)
@pytest.mark.parametrize("mask_kind", [None, "b1qk", "b11k", "qk"])
def test_masked_matches_reference(device, dtype, sk, mask_kind):
    b, h, sq = 2, 3, 5
    x = leaf((b, h, sq, sk), dtype, device, scale=3.0)
    mask = _padding_mask(mask_kind, b, sq, sk, device)

    def fn(s, ref):
        return (reference.scaled_masked_softmax if ref else scaled_masked_softmax)(s, mask, SCALE)

    _check(fn, x, dtype, grad_scale=2.0)


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("sk", KEYS)
@pytest.mark.parametrize("window", [None, 1, 3, 100000])
def test_causal_matches_reference(device, dtype, sk, window):
    # sq == sk (the usual triangle), and sq < sk (queries aligned to the end of the keys)
    for sq in sorted({sk if sk <= 1000 else 600, max(1, min(sk // 3, 200)), 1}):
        x = leaf((1, 2, sq, sk), dtype, device, scale=3.0)

        def fn(s, ref):
            return (reference.scaled_causal_softmax if ref else scaled_causal_softmax)(s, SCALE, window)

        _check(fn, x, dtype, grad_scale=2.0)


@pytest.mark.isa
@device_params
@dtype_params
def test_non_contiguous_scores_and_mask(device, dtype):
    x = leaf((2, 3, 7, 2 * 131), dtype, device, scale=3.0)[..., ::2].detach().requires_grad_()
    mask = (torch.rand(2, 1, 7, 2 * 131, device=device) < 0.5)[..., ::2]  # strided keys: copied
    mask_t = torch.rand(2, 131, 7, device=device).transpose(1, 2) < 0.5  # [2, 7, 131] with key stride 7
    for m in (mask, mask_t.unsqueeze(1)):
        _check(lambda s, ref: (reference if ref else _ops).scaled_masked_softmax(s, m, -1.5), x, dtype, 2.0)
        x.grad = None
    xt = leaf((2, 3, 40, 33), dtype, device).transpose(-1, -2).detach().requires_grad_()  # [2, 3, 33, 40]
    _check(lambda s, ref: (reference if ref else _ops).scaled_causal_softmax(s, 2.0, 5), xt, dtype, 2.0)


@device_params
def test_mask_broadcast_shapes(device):
    x = leaf((2, 2, 3, 4, 9), torch.float32, device)
    shapes = [(), (1,), (9,), (4, 1), (3, 1, 9), (2, 1, 3, 4, 1), (1, 2, 1, 4, 9), (2, 2, 3, 4, 9)]
    for shape in shapes:
        mask = torch.rand(shape, device=device) < 0.4
        _check(lambda s, ref: (reference if ref else _ops).scaled_masked_softmax(s, mask, 0.5), x, torch.float32)
        x.grad = None
    # Alternating broadcast dims do not coalesce into 6 dims: the mask is then materialized.
    x = leaf((2,) * 8 + (5,), torch.float32, device)
    mask = torch.rand((2, 1) * 4 + (5,), device=device) < 0.4
    _check(lambda s, ref: (reference if ref else _ops).scaled_masked_softmax(s, mask, 0.5), x, torch.float32)


@device_params
@dtype_params
def test_fully_masked_rows_give_zeros_and_zero_grads(device, dtype):
    x = leaf((2, 2, 4, 50), dtype, device)
    mask = torch.zeros(2, 1, 4, 50, dtype=torch.bool, device=device)
    mask[0, :, 1] = True
    mask[1] = True
    y = scaled_masked_softmax(x, mask, 1.0)
    y.backward(torch.randn_like(y))
    excluded = mask.expand_as(x).all(-1)
    assert torch.equal(y[excluded], torch.zeros_like(y[excluded]))
    assert torch.equal(x.grad[excluded], torch.zeros_like(x.grad[excluded]))
    assert not y.isnan().any() and not x.grad.isnan().any()
    # -inf scores count as excluded too: the reference gives 0, not NaN
    s = torch.full((3, 8), float("-inf"), dtype=dtype, device=device)
    assert torch.equal(scaled_masked_softmax(s, None, 1.0), torch.zeros_like(s))


@device_params
def test_large_rows_and_many_rows(device):
    x = leaf((2, 65536 + 3), torch.float32, device, scale=5.0)
    _check(lambda s, ref: (reference if ref else _ops).scaled_masked_softmax(s, None, 1.0), x, torch.float32)
    x = leaf((1, 3000, 3000), torch.bfloat16, device, scale=5.0)
    _check(lambda s, ref: (reference if ref else _ops).scaled_causal_softmax(s, 1.0, 2000), x, torch.bfloat16, 2.0)
    x = leaf((20000, 2), torch.float32, device)
    _check(lambda s, ref: (reference if ref else _ops).scaled_masked_softmax(s, None, 1.0), x, torch.float32)


@device_params
def test_empty_batch(device):
    for shape in [(0, 4, 8, 8), (2, 0, 8), (3, 0)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        y = scaled_masked_softmax(x, torch.ones(shape[-1], dtype=torch.bool, device=device), 1.0)
        y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape
    x = torch.empty(0, 4, 6, 8, device=device, requires_grad=True)
    y = scaled_causal_softmax(x, 1.0, 2)
    y.sum().backward()
    assert y.shape == x.shape


@device_params
def test_gradcheck_float64(device):
    x = torch.randn(2, 2, 5, 11, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(2, 1, 5, 11, device=device) < 0.4
    mask[0, 0, 2] = True
    assert torch.autograd.gradcheck(lambda s: scaled_masked_softmax(s, mask, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda s: scaled_masked_softmax(s, None, -1.3), (x,))
    assert torch.autograd.gradcheck(lambda s: scaled_causal_softmax(s, 0.7), (x,))
    assert torch.autograd.gradcheck(lambda s: scaled_causal_softmax(s, 0.7, 3), (x,))


@device_params
def test_opcheck(device):
    x = torch.randn(2, 3, 5, 33, device=device, requires_grad=True)
    mask = torch.rand(2, 1, 5, 33, device=device) < 0.3
    ops = torch.ops.megacore
    torch.library.opcheck(ops.scaled_masked_softmax.default, (x, mask, 0.5))
    torch.library.opcheck(ops.scaled_masked_softmax.default, (x, None, 0.5))
    torch.library.opcheck(ops.scaled_causal_softmax.default, (x, 0.5, None))
    torch.library.opcheck(ops.scaled_causal_softmax.default, (x, 0.5, 4))
    p = torch.softmax(torch.randn(2, 3, 5, 33, device=device), -1)
    torch.library.opcheck(ops.scaled_softmax_backward.default, (torch.randn_like(p), p, 0.5))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    mask = torch.rand(2, 1, 6, 40, device=device) < 0.3

    def f(x):
        return (scaled_masked_softmax(x * 2, mask, 0.5) * scaled_causal_softmax(x, 0.5, 7)).sum()

    x = torch.randn(2, 3, 6, 40, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(compile_fullgraph(f)(x), (x,))
    (e,) = torch.autograd.grad(f(x), (x,))
    torch.testing.assert_close(g, e)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(2, 3, 4, 6, device=device)
    with pytest.raises(TypeError, match=r"megacore\.scaled_masked_softmax: mask has dtype Float, expected Bool"):
        scaled_masked_softmax(x, torch.zeros(4, 6, device=device), 1.0)
    with pytest.raises(
        ValueError,
        match=r"megacore\.scaled_masked_softmax: mask has shape \[2, 1, 5, 6\], which does not broadcast to "
        r"scores' shape \[2, 3, 4, 6\]",
    ):
        scaled_masked_softmax(x, torch.zeros(2, 1, 5, 6, dtype=torch.bool, device=device), 1.0)
    with pytest.raises(ValueError, match=r"megacore\.scaled_masked_softmax: mask has shape \[1, 2, 3, 4, 6\]"):
        scaled_masked_softmax(x, torch.zeros(1, 2, 3, 4, 6, dtype=torch.bool, device=device), 1.0)
    with pytest.raises(TypeError, match=r"megacore\.scaled_masked_softmax: scores has dtype Long"):
        scaled_masked_softmax(torch.ones(4, 6, dtype=torch.long, device=device), None, 1.0)
    with pytest.raises(ValueError, match=r"megacore\.scaled_masked_softmax: scores has 1 dims"):
        scaled_masked_softmax(torch.randn(6, device=device), None, 1.0)
    with pytest.raises(ValueError, match=r"megacore\.scaled_causal_softmax: scores has sq = 5 > sk = 4"):
        scaled_causal_softmax(torch.randn(2, 5, 4, device=device), 1.0)
    with pytest.raises(ValueError, match=r"megacore\.scaled_causal_softmax: window is 0, expected >= 1"):
        scaled_causal_softmax(x, 1.0, 0)
    with pytest.raises(ValueError, match=r"megacore\.scaled_causal_softmax: window is -2, expected >= 1"):
        scaled_causal_softmax(x, 1.0, -2)
    backward = torch.ops.megacore.scaled_softmax_backward
    with pytest.raises(ValueError, match=r"megacore\.scaled_softmax_backward: grad_out has shape \[2, 3, 4, 5\]"):
        backward(torch.randn(2, 3, 4, 5, device=device), x, 1.0)
    with pytest.raises(TypeError, match=r"megacore\.scaled_softmax_backward: grad_out has dtype Half"):
        backward(x.half(), x, 1.0)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"megacore\.scaled_masked_softmax: mask is on cuda"):
            scaled_masked_softmax(x, torch.zeros(4, 6, dtype=torch.bool, device="cuda"), 1.0)
