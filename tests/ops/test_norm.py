"""megacore.ops.layer_norm / rms_norm against F.layer_norm / F.rms_norm in float64."""

import pytest
import torch

from megacore.ops import layer_norm, reference, rms_norm
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)

HIDDEN = [1, 3, 127, 1000, 4097, 8192]
KINDS = ["layer", "rms"]


def _run(kind, x, weight, bias, eps):
    if kind == "layer":
        return layer_norm(x, weight, bias, eps)
    return rms_norm(x, weight, eps)


def _reference(kind, x, weight, bias, eps):
    if kind == "layer":
        return reference.layer_norm(x, weight, bias, eps)
    return reference.rms_norm(x, weight, eps)


def _check(kind, shape, dtype, device, with_weight=True, with_bias=True, eps=1e-5, noncontig=False):
    hidden = shape[-1]
    x = leaf(shape, dtype, device, scale=2.0)
    x = (x + 0.5).detach().requires_grad_()  # a non-zero mean, so centering matters
    if noncontig:
        x = leaf(shape[:-1] + (2 * hidden,), dtype, device, scale=2.0)[..., ::2].detach().requires_grad_()
    weight = leaf((hidden,), dtype, device) if with_weight else None
    bias = leaf((hidden,), dtype, device) if with_bias and kind == "layer" else None
    y = _run(kind, x, weight, bias, eps)
    grad = torch.randn_like(y)
    y.backward(grad)

    xd, wd, bd = as_double_leaf(x), as_double_leaf(weight), as_double_leaf(bias)
    yd = _reference(kind, xd, wd, bd, eps)
    yd.backward(grad.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yd, dtype, msg="output")
    # grad_x is rstd * (a difference of O(1) terms): its rounding error grows with rstd (hidden=1 has
    # rstd = 1/sqrt(eps) and a gradient that is exactly 0).
    xc = xd.detach() - (xd.detach().mean(-1, keepdim=True) if kind == "layer" else 0)
    rstd_max = float((xc.pow(2).mean(-1) + eps).rsqrt().max()) if x.numel() else 1.0
    assert_close(x.grad, xd.grad, dtype, scale=max(1.0, rstd_max), msg="grad x")
    rows = x.numel() // max(hidden, 1)
    if with_weight:
        assert_close(weight.grad, wd.grad, dtype, scale=max(1.0, rows**0.5), msg="grad weight")
    if bias is not None:
        assert_close(bias.grad, bd.grad, dtype, scale=max(1.0, rows**0.5), msg="grad bias")


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_over_hidden_sizes(device, dtype, hidden, kind):
    _check(kind, (5, 3, hidden), dtype, device)


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("kind", KINDS)
def test_without_weight_or_bias_and_non_contiguous_input(device, dtype, kind):
    _check(kind, (7, 333), dtype, device, with_weight=False, with_bias=False)
    _check(kind, (7, 333), dtype, device, with_weight=False, with_bias=True)
    _check(kind, (7, 333), dtype, device, with_weight=True, with_bias=False)
    _check(kind, (7, 333), dtype, device, noncontig=True)


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 1e-2, 1.0])
def test_eps(device, kind, eps):
    _check(kind, (6, 100), torch.float32, device, eps=eps)


@device_params
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_saved_statistics(device, dtype):
    x = torch.randn(4, 3, 77, dtype=dtype, device=device) * 3 + 1
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xd = x.double()
    _, mean, rstd = torch.ops.megacore.layer_norm(x, None, None, 1e-5)
    assert mean.shape == rstd.shape == (4, 3) and mean.dtype == rstd.dtype == stat_dtype
    assert_close(mean, xd.mean(-1), stat_dtype)
    assert_close(rstd, (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), stat_dtype)
    _, rstd = torch.ops.megacore.rms_norm(x, None, 1e-5)
    assert rstd.shape == (4, 3) and rstd.dtype == stat_dtype
    assert_close(rstd, (xd.pow(2).mean(-1) + 1e-5).rsqrt(), stat_dtype)
    # A large offset: a two-pass variance keeps its precision where E[x^2] - E[x]^2 would not.
    x = torch.randn(8, 512, device=device) + 1000.0
    _, mean, rstd = torch.ops.megacore.layer_norm(x, None, None, 1e-5)
    expected = (x.double().var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(rstd.double(), expected, rtol=1e-4, atol=0)


@device_params
@pytest.mark.parametrize("kind", KINDS)
def test_rank_one_input(device, kind):
    _check(kind, (129,), torch.float32, device)


@device_params
@pytest.mark.parametrize("kind", KINDS)
def test_large_row_and_many_rows(device, kind):
    _check(kind, (2, 65536 + 3), torch.float32, device)
    _check(kind, (20000, 8), torch.float32, device)


@device_params
@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(device, kind):
    x = torch.empty(0, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True) if kind == "layer" else None
    y = _run(kind, x, w, b, 1e-5)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros(64, device=device))
    if b is not None:
        assert torch.equal(b.grad, torch.zeros(64, device=device))


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_gradients_do_not_depend_on_thread_count(kind):
    x = torch.randn(999, 300, requires_grad=True)
    w = torch.randn(300, requires_grad=True)
    b = torch.randn(300, requires_grad=True) if kind == "layer" else None
    g = torch.randn(999, 300)
    params = [w] + ([b] if b is not None else [])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(_run(kind, x, w, b, 1e-5), params, g))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e)


@device_params
def test_gradcheck_float64(device):
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, w, b = torch.randn(4, 19, **opts), torch.randn(19, **opts), torch.randn(19, **opts)
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: layer_norm(x, None, None, 1e-5), (x,))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x: rms_norm(x, None, 1e-6), (x,))


@device_params
def test_opcheck(device):
    ops = torch.ops.megacore
    x = torch.randn(6, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    torch.library.opcheck(ops.layer_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(ops.layer_norm.default, (x, None, None, 1e-5))
    torch.library.opcheck(ops.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(ops.rms_norm.default, (x, None, 1e-6))
    g = torch.randn(6, 33, device=device)
    xd, wd = x.detach(), w.detach()
    _, mean, rstd = ops.layer_norm(xd, wd, b.detach(), 1e-5)
    torch.library.opcheck(ops.layer_norm_backward.default, (g, xd, wd, mean, rstd, True))
    torch.library.opcheck(ops.layer_norm_backward.default, (g, xd, None, mean, rstd, False))
    _, rstd = ops.rms_norm(xd, wd, 1e-6)
    torch.library.opcheck(ops.rms_norm_backward.default, (g, xd, wd, rstd))
    torch.library.opcheck(ops.rms_norm_backward.default, (g, xd, None, rstd))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, w, b):
        return (layer_norm(x * 2, w, b) * rms_norm(x, w)).sum()

    x = torch.randn(8, 65, device=device, requires_grad=True)
    w = torch.randn(65, device=device, requires_grad=True)
    b = torch.randn(65, device=device, requires_grad=True)
    got = torch.autograd.grad(compile_fullgraph(f)(x, w, b), (x, w, b))
    expected = torch.autograd.grad(f(x, w, b), (x, w, b))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"megacore\.layer_norm: weight has shape \[7\], expected \[8\]"):
        layer_norm(x, torch.randn(7, device=device), None)
    with pytest.raises(ValueError, match=r"megacore\.layer_norm: bias has shape \[1, 8\], expected \[8\]"):
        layer_norm(x, None, torch.randn(1, 8, device=device))
    with pytest.raises(TypeError, match=r"megacore\.layer_norm: bias has dtype Half, expected Float"):
        layer_norm(x, None, torch.randn(8, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"megacore\.layer_norm: eps is -1, expected a finite value >= 0"):
        layer_norm(x, None, None, -1.0)
    with pytest.raises(ValueError, match=r"megacore\.rms_norm: eps is nan"):
        rms_norm(x, None, float("nan"))
    with pytest.raises(ValueError, match=r"megacore\.rms_norm: weight has shape \[9\], expected \[8\]"):
        rms_norm(x, torch.randn(9, device=device))
    with pytest.raises(TypeError, match=r"megacore\.rms_norm: x has dtype Long"):
        rms_norm(torch.ones(4, 8, dtype=torch.long, device=device), None)
    with pytest.raises(ValueError, match=r"megacore\.rms_norm: x has 0 dims"):
        rms_norm(torch.tensor(1.0, device=device), None)

    ops = torch.ops.megacore
    _, mean, rstd = ops.layer_norm(x, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"megacore\.layer_norm_backward: grad_out has shape \[4, 7\], expected \[4, 8\]"):
        ops.layer_norm_backward(torch.randn(4, 7, device=device), x, None, mean, rstd, False)
    with pytest.raises(ValueError, match=r"megacore\.layer_norm_backward: rstd has shape \[3\], expected \[4\]"):
        ops.layer_norm_backward(x, x, None, mean, rstd[:3], False)
    with pytest.raises(TypeError, match=r"megacore\.layer_norm_backward: mean has dtype BFloat16, expected Float"):
        ops.layer_norm_backward(x, x, None, mean.bfloat16(), rstd, False)
    with pytest.raises(TypeError, match=r"megacore\.rms_norm_backward: grad_out has dtype Double, expected Float"):
        ops.rms_norm_backward(x.double(), x, None, rstd)
    with pytest.raises(ValueError, match=r"megacore\.rms_norm_backward: weight has shape \[3\], expected \[8\]"):
        ops.rms_norm_backward(x, x, torch.randn(3, device=device), rstd)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"weight is on cuda"):
            layer_norm(x, torch.randn(8, device="cuda"), None)
