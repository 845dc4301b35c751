"""megacore.ops.scaled_bias_softmax against softmax(scale * scores + bias) with mask and causal exclusions,
and its backward's gradients for scores and bias (the bias's summed over its broadcast dims)."""

import pytest
import torch

from megacore.ops import reference, scaled_bias_softmax
from tests.ops.utils import (
    DTYPES,
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    leaf,
)

SCALE = 0.37
B, H = 2, 3

# bias broadcast kinds: a letter keeps that dim of scores [b, h, q, k], a 1 broadcasts it
BIAS_KINDS = ["1hqk", "bhqk", "1h1k", "b11k", "bhq1", "1111"]

# (padding mask, causal, window): each exclusion alone, and both together
MASKINGS = [(False, False, None), (True, False, None), (False, True, None), (False, True, 3), (True, True, 2)]


def _bias_shape(kind, b, h, sq, sk):
    return tuple(n if c != "1" else 1 for c, n in zip(kind, (b, h, sq, sk)))


def _padding_mask(b, sq, sk, device):
    """Bool [b, 1, sq, sk] (True = excluded): random holes, key padding, and one row excluding every key."""
    mask = torch.rand(b, 1, sq, sk, device=device) < 0.3
    mask[..., sk - sk // 4 :] = True
    mask[0, 0, 0] = True
    return mask


def _check(x, bias, mask, causal, window, dtype, grad_tol=2.0):
    """Forward and both gradients against the reference in float64 from the same inputs."""
    y = scaled_bias_softmax(x, bias, mask, SCALE, causal, window)
    grad = torch.randn_like(y)
    y.backward(grad)
    xd, bd = as_double_leaf(x), as_double_leaf(bias)
    yd = reference.scaled_bias_softmax(xd, bd, mask, SCALE, causal, window)
    yd.backward(grad.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert bias.grad.dtype == dtype and bias.grad.shape == bias.shape
    assert not y.isnan().any() and not x.grad.isnan().any() and not bias.grad.isnan().any()
    assert_close(y, yd, dtype, msg="output")
    assert_close(x.grad, xd.grad, dtype, scale=grad_tol, msg="grad scores")
    # The bias gradient sums dS over the score rows that share a bias row, each rounded through the dtype.
    summed = x[..., 0].numel() // max(bias[..., 0].numel(), 1)
    assert_close(bias.grad, bd.grad, dtype, scale=grad_tol * max(1.0, summed**0.5), msg="grad bias")


def _check_every_masking(device, dtype, sk, kind):
    for with_mask, causal, window in MASKINGS:
        sq = min(sk, 7) if causal else 7  # sq > sk, sq == sk and sq < sk all occur
        x = leaf((B, H, sq, sk), dtype, device, scale=3.0)
        bias = leaf(_bias_shape(kind, B, H, sq, sk), dtype, device, scale=2.0)
        mask = _padding_mask(B, sq, sk, device) if with_mask else None
        _check(x, bias, mask, causal, window, dtype)


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("sk", [1, 7, 33, 130])
@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_matches_reference(device, dtype, sk, kind):
    _check_every_masking(device, dtype, sk, kind)


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_float64_matches_reference(device, kind):
    for sk in (7, 33):
        _check_every_masking(device, torch.float64, sk, kind)


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_many_bias_rows_and_long_rows(device, dtype):
    # [1, h, sq, sk] with h * sq >= 1024 bias rows: each bias row's gradient summed in one task over the batch
    x = leaf((2, 4, 260, 270), dtype, device, scale=3.0)
    _check(x, leaf((1, 4, 260, 270), dtype, device), None, True, None, dtype)
    # rows longer than a CUDA warp holds (1024 keys), a bias broadcast over most rows
    x = leaf((2, 2, 3, 1100), dtype, device, scale=3.0)
    _check(x, leaf((1, 2, 1, 1100), dtype, device), _padding_mask(2, 3, 1100, device), False, None, dtype)
    x = leaf((2, 2, 3, 1100), dtype, device, scale=3.0)
    _check(x, leaf((2, 1, 3, 1), dtype, device), None, True, 700, dtype)


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_non_contiguous_scores_bias_and_mask(device, dtype):
    x = leaf((2, 3, 33, 7), dtype, device, scale=3.0).transpose(-1, -2).detach().requires_grad_()  # [2, 3, 7, 33]
    bias = leaf((1, 3, 33, 7), dtype, device).transpose(-1, -2).detach().requires_grad_()  # [1, 3, 7, 33]
    mask = (torch.rand(2, 1, 7, 66, device=device) < 0.4)[..., ::2]
    _check(x, bias, mask, True, 5, dtype)


@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fully_excluded_rows_give_zeros_and_zero_grads(device, dtype):
    x = leaf((2, 2, 4, 9), dtype, device)
    bias = leaf((1, 2, 4, 9), dtype, device)
    mask = torch.zeros(2, 1, 4, 9, dtype=torch.bool, device=device)
    mask[0, :, 1] = True  # a padding row
    mask[1, :, 2, 5:8] = True  # causal query 2 (sq = 4, sk = 9) with window 3 sees keys 5..7 only
    for causal, window in [(False, None), (True, 3)]:
        x.grad, bias.grad = None, None
        y = scaled_bias_softmax(x, bias, mask, 1.0, causal, window)
        grad = torch.randn_like(y)
        y.backward(grad)
        empty = torch.zeros_like(y, dtype=torch.bool)
        empty[0, :, 1] = True
        if causal:
            empty[1, :, 2] = True
        assert torch.equal(y[empty], torch.zeros_like(y[empty]))
        assert torch.equal(x.grad[empty], torch.zeros_like(x.grad[empty]))
        assert not y.isnan().any() and not x.grad.isnan().any() and not bias.grad.isnan().any()
        # the empty rows add nothing to the bias gradient, as in the reference
        xd, bd = as_double_leaf(x), as_double_leaf(bias)
        reference.scaled_bias_softmax(xd, bd, mask, 1.0, causal, window).backward(grad.double())
        assert_close(bias.grad, bd.grad, dtype, scale=4.0, msg="grad bias")
    # a bias of -inf over a whole row excludes every key too
    bias = torch.zeros(1, 1, 3, 8, dtype=dtype, device=device)
    bias[0, 0, 1] = float("-inf")
    y = scaled_bias_softmax(torch.randn(2, 2, 3, 8, device=device).to(dtype), bias)
    assert torch.equal(y[:, :, 1], torch.zeros_like(y[:, :, 1])) and not y.isnan().any()


@device_params
def test_empty_batch(device):
    x = torch.empty(0, 3, 4, 6, device=device, requires_grad=True)
    bias = torch.randn(1, 3, 4, 6, device=device, requires_grad=True)
    y = scaled_bias_softmax(x, bias, None, 1.0, True)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@device_params
def test_gradcheck_float64(device):
    x = torch.randn(2, 2, 5, 11, dtype=torch.float64, device=device, requires_grad=True)
    mask = torch.rand(2, 1, 5, 11, device=device) < 0.4
    mask[0, 0, 2] = True
    for shape, m, causal, window in [((1, 2, 5, 11), mask, False, None), ((2, 2, 5, 11), None, True, 3),
                                     ((1, 2, 1, 11), mask, True, None), ((2, 1, 5, 1), None, False, None)]:
        bias = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda s, b: scaled_bias_softmax(s, b, m, 0.7, causal, window), (x, bias))


@device_params
def test_opcheck(device):
    x = torch.randn(2, 3, 5, 33, device=device, requires_grad=True)
    mask = torch.rand(2, 1, 5, 33, device=device) < 0.3
    ops = torch.ops.megacore
    for shape, m, causal, window in [((1, 3, 5, 33), mask, False, None), ((2, 3, 5, 33), None, True, 4),
                                     ((1, 3, 1, 33), mask, True, None)]:
        bias = torch.randn(shape, device=device, requires_grad=True)
        torch.library.opcheck(ops.scaled_bias_softmax.default, (x, bias, m, 0.5, causal, window))
    p = torch.softmax(torch.randn(2, 3, 5, 33, device=device), -1)
    for shape in ([1, 3, 5, 33], [2, 3, 5, 33], [1, 3, 1, 33], [2, 1, 5, 1]):
        torch.library.opcheck(ops.scaled_bias_softmax_backward.default, (torch.randn_like(p), p, 0.5, shape))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    mask = torch.rand(2, 1, 6, 40, device=device) < 0.3

    def f(x, t5, alibi):
        return (scaled_bias_softmax(x, t5, mask, 0.5) * scaled_bias_softmax(x * 2, alibi, None, 0.5, True, 7)).sum()

    x = torch.randn(2, 3, 6, 40, device=device, requires_grad=True)
    t5 = torch.randn(1, 3, 6, 40, device=device, requires_grad=True)
    alibi = torch.randn(1, 3, 1, 40, device=device, requires_grad=True)
    compiled = torch.autograd.grad(compile_fullgraph(f)(x, t5, alibi), (x, t5, alibi))
    eager = torch.autograd.grad(f(x, t5, alibi), (x, t5, alibi))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(2, 3, 4, 6, device=device)
    bias = torch.randn(1, 3, 4, 6, device=device)
    op = r"megacore\.scaled_bias_softmax: "
    with pytest.raises(ValueError, match=op + r"bias has shape \[3, 4, 6\], expected 4 dims \[b, h, sq, sk\], each 1 "
                       r"or the size of scores' dim \(scores: \[2, 3, 4, 6\]\)"):
        scaled_bias_softmax(x, torch.randn(3, 4, 6, device=device))
    with pytest.raises(ValueError, match=op + r"bias has shape \[1, 3, 5, 6\], expected each dim 1 or the size of "
                       r"scores' dim: dim 2 is 5, expected 1 or 4 \(scores: \[2, 3, 4, 6\]\)"):
        scaled_bias_softmax(x, torch.randn(1, 3, 5, 6, device=device))
    with pytest.raises(TypeError, match=op + r"bias has dtype Double, expected Float \(the dtype of scores\)"):
        scaled_bias_softmax(x, bias.double())
    with pytest.raises(ValueError, match=op + r"bias is on meta, expected cpu \(the device of scores\)"):
        scaled_bias_softmax(x.cpu(), bias.to("meta"))
    with pytest.raises(TypeError, match=op + r"mask has dtype Float, expected Bool"):
        scaled_bias_softmax(x, bias, torch.zeros(4, 6, device=device))
    with pytest.raises(ValueError, match=op + r"mask has shape \[2, 1, 5, 6\], which does not broadcast"):
        scaled_bias_softmax(x, bias, torch.zeros(2, 1, 5, 6, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=op + r"window is 3 but causal is False; a sliding window needs causal=True"):
        scaled_bias_softmax(x, bias, None, 1.0, False, 3)
    with pytest.raises(ValueError, match=op + r"window is 0, expected >= 1"):
        scaled_bias_softmax(x, bias, None, 1.0, True, 0)
    with pytest.raises(ValueError, match=op + r"scores has sq = 7 > sk = 6"):
        scaled_bias_softmax(torch.randn(2, 3, 7, 6, device=device), torch.randn(1, 3, 7, 6, device=device), causal=True)
    with pytest.raises(ValueError, match=op + r"scores has 3 dims \(shape \[3, 4, 6\]\), expected 4: \[b, h, sq, sk\]"):
        scaled_bias_softmax(x[0], bias)
    with pytest.raises(TypeError, match=op + r"scores has dtype Long"):
        scaled_bias_softmax(torch.ones(2, 3, 4, 6, dtype=torch.long, device=device), bias.long())
    backward = torch.ops.megacore.scaled_bias_softmax_backward
    op = r"megacore\.scaled_bias_softmax_backward: "
    with pytest.raises(ValueError, match=op + r"bias_shape has shape \[1, 3, 4, 5\], expected each dim 1 or the size "
                       r"of probs' dim: dim 3 is 5, expected 1 or 6 \(probs: \[2, 3, 4, 6\]\)"):
        backward(x, x, 1.0, [1, 3, 4, 5])
    with pytest.raises(ValueError, match=op + r"bias_shape has shape \[3, 4, 6\], expected 4 dims"):
        backward(x, x, 1.0, [3, 4, 6])
    with pytest.raises(ValueError, match=op + r"grad_out has shape \[2, 3, 4, 5\], expected \[2, 3, 4, 6\]"):
        backward(torch.randn(2, 3, 4, 5, device=device), x, 1.0, [1, 3, 4, 6])
    with pytest.raises(TypeError, match=op + r"grad_out has dtype Half"):
        backward(x.half(), x, 1.0, [1, 3, 4, 6])
