"""megacore.ops.bias_dropout_add against residual + dropout(x + bias) with the same keep mask.

The keep mask is checked against an independent numpy Philox-4x32-10 written here from the published
algorithm (Salmon et al., SC'11) and validated on Random123's known-answer vectors.
"""

import math

import numpy as np
import pytest
import torch

from megacore.ops import bias_dropout_add, reference
from tests.ops.utils import (
    as_double_leaf,
    assert_close,
    compile_fullgraph,
    device_params,
    dtype_params,
    leaf,
)

HIDDEN = [1, 3, 127, 1000, 4097]
_op = torch.ops.megacore.bias_dropout_add
_U32 = np.uint64(0xFFFFFFFF)


# ---- the independent reference: Philox-4x32-10 in numpy -----------------------------------------------
def _philox4x32_10(ctr, key):
    """ctr: 4 arrays of uint32 values (held as uint64), key: 2 ints -> the 4 output words (uint64 arrays)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for i in range(10):
        if i > 0:
            k0 = (k0 + np.uint64(0x9E3779B9)) & _U32
            k1 = (k1 + np.uint64(0xBB67AE85)) & _U32
        p0 = c0 * np.uint64(0xD2511F53)  # < 2^64: no overflow
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32
    return c0, c1, c2, c3


def _keep_mask(seed: int, shape, p: float) -> torch.Tensor:
    """Element e keeps iff word e % 4 of Philox(counter = e // 4, key = seed as (low, high)) >= ceil(p 2^32)."""
    n = math.prod(shape)
    q = np.arange((n + 3) // 4, dtype=np.uint64)
    s = seed % 2**64
    words = _philox4x32_10((q & _U32, q >> np.uint64(32), 0 * q, 0 * q), (s & 0xFFFFFFFF, s >> 32))
    u = np.stack(words, axis=1).reshape(-1)[:n]
    threshold = min(math.ceil(p * 2**32), 2**32 - 1)
    return torch.from_numpy(u >= threshold).reshape(shape)


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def test_numpy_philox_known_answers():
    # Random123 tests/kat_vectors, the "philox4x32 10" lines: counter, key -> output.
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in kat:
        got = tuple(int(w[0]) for w in _philox4x32_10([[c] for c in ctr], key))
        assert got == tuple(want)


def _kernel_mask(shape, p, seed, device, dtype=torch.float32):
    """The kernel's mask: with x = 1, residual = 0, kept elements come out as 1 / (1 - p), dropped as 0."""
    x = torch.ones(shape, dtype=dtype, device=device)
    out = _op(x, None, torch.zeros_like(x), p, _seed(seed))
    return (out != 0).cpu()


@pytest.mark.isa
@device_params
@pytest.mark.parametrize("seed", [0, 1, 123456789, -1, 2**62 + 7, -(2**63)])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (5, 127), (2, 1001), (4099,)])
def test_mask_is_philox_of_seed_and_index(device, seed, shape):
    assert torch.equal(_kernel_mask(shape, 0.3, seed, device), _keep_mask(seed, shape, 0.3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_draw_the_same_mask():
    for shape in [(7, 129), (3, 4096), (1000,)]:
        for p in [0.1, 0.5]:
            assert torch.equal(_kernel_mask(shape, p, 42, "cpu"), _kernel_mask(shape, p, 42, "cuda"))


def test_mask_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel_mask((300, 999), 0.5, 7, "cpu")
        torch.set_num_threads(max(2, threads))
        many = _kernel_mask((300, 999), 0.5, 7, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def _check(shape, dtype, device, p=0.3, seed=1234, with_bias=True, noncontig=False):
    x = leaf(shape, dtype, device)
    if noncontig:
        x = leaf(shape[:-1] + (2 * shape[-1],), dtype, device)[..., ::2].detach().requires_grad_()
    bias = leaf((shape[-1],), dtype, device) if with_bias else None
    residual = leaf(shape, dtype, device)
    y = _op(x, bias, residual, p, _seed(seed))
    grad = torch.randn_like(y)
    y.backward(grad)

    mask = _keep_mask(seed, shape, p).to(device)
    xd, bd, rd = as_double_leaf(x), as_double_leaf(bias), as_double_leaf(residual)
    yd = reference.bias_dropout_add(xd, bd, rd, p, keep_mask=mask)
    yd.backward(grad.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, yd, dtype, msg="output")
    assert_close(x.grad, xd.grad, dtype, msg="grad x")
    assert_close(residual.grad, rd.grad, dtype, msg="grad residual")
    if with_bias:
        rows = x.numel() // max(shape[-1], 1)
        assert_close(bias.grad, bd.grad, dtype, scale=max(1.0, rows**0.5), msg="grad bias")


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("hidden", HIDDEN)
def test_matches_reference_over_hidden_sizes(device, dtype, hidden):
    _check((5, 3, hidden), dtype, device)


@pytest.mark.isa
@device_params
@dtype_params
def test_without_bias_non_contiguous_and_p_zero(device, dtype):
    _check((7, 333), dtype, device, with_bias=False)
    _check((7, 333), dtype, device, noncontig=True, p=0.75, seed=-5)
    _check((7, 333), dtype, device, p=0.0)


@device_params
def test_large_row_and_many_rows(device):
    _check((2, 65536 + 3), torch.float32, device)
    _check((20000, 8), torch.float32, device, p=0.5)


@device_params
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(device, p):
    n = 1 << 20
    kept = _kernel_mask((n // 1024, 1024), p, 99, device).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma


@device_params
def test_seed_determines_the_mask(device):
    a = _kernel_mask((64, 100), 0.5, 5, device)
    assert torch.equal(a, _kernel_mask((64, 100), 0.5, 5, device))
    assert not torch.equal(a, _kernel_mask((64, 100), 0.5, 6, device))
    # The public function draws its seed from torch's CPU generator.
    x = torch.randn(64, 100, device=device)
    r = torch.randn(64, 100, device=device)
    torch.manual_seed(3)
    y1 = bias_dropout_add(x, None, r, 0.5)
    y2 = bias_dropout_add(x, None, r, 0.5)
    torch.manual_seed(3)
    assert torch.equal(y1, bias_dropout_add(x, None, r, 0.5))
    assert not torch.equal(y1, y2)
    g = torch.Generator().manual_seed(11)
    y3 = bias_dropout_add(x, None, r, 0.5, generator=g)
    g.manual_seed(11)
    assert torch.equal(y3, bias_dropout_add(x, None, r, 0.5, generator=g))


@device_params
def test_p_zero_and_eval_are_exact(device):
    x = torch.randn(9, 77, device=device, requires_grad=True)
    b = torch.randn(77, device=device, requires_grad=True)
    r = torch.randn(9, 77, device=device, requires_grad=True)
    expected = r + (x + b)
    assert torch.equal(bias_dropout_add(x, b, r, 0.0), expected)
    assert torch.equal(bias_dropout_add(x, b, r, 0.9, training=False), expected)
    g = torch.randn(9, 77, device=device)
    bias_dropout_add(x, b, r, 0.0).backward(g)
    assert torch.equal(x.grad, g) and torch.equal(r.grad, g)


@device_params
def test_empty_batch(device):
    x = torch.empty(0, 64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    y = bias_dropout_add(x, b, torch.empty(0, 64, device=device), 0.5)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(b.grad, torch.zeros(64, device=device))


@device_params
def test_gradcheck_float64(device):
    x = torch.randn(4, 19, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(19, dtype=torch.float64, device=device, requires_grad=True)
    r = torch.randn(4, 19, dtype=torch.float64, device=device, requires_grad=True)
    seed = _seed(77)
    assert torch.autograd.gradcheck(lambda x, b, r: _op(x, b, r, 0.4, seed), (x, b, r))
    assert torch.autograd.gradcheck(lambda x, r: _op(x, None, r, 0.4, seed), (x, r))


@device_params
def test_opcheck(device):
    x = torch.randn(6, 33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    r = torch.randn(6, 33, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.megacore.bias_dropout_add.default, (x, b, r, 0.3, _seed(1)))
    torch.library.opcheck(torch.ops.megacore.bias_dropout_add.default, (x, None, r, 0.0, _seed(2)))
    g = torch.randn(6, 33, device=device)
    torch.library.opcheck(torch.ops.megacore.bias_dropout_add_backward.default, (g, 0.3, _seed(1), True))
    torch.library.opcheck(torch.ops.megacore.bias_dropout_add_backward.default, (g, 0.3, _seed(1), False))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, b, r, seed):
        return (_op(x * 2, b, r, 0.25, seed) * r).sum()

    x = torch.randn(8, 65, device=device, requires_grad=True)
    b = torch.randn(65, device=device, requires_grad=True)
    r = torch.randn(8, 65, device=device, requires_grad=True)
    seed = _seed(2024)
    got = torch.autograd.grad(compile_fullgraph(f)(x, b, r, seed), (x, b, r))
    want = torch.autograd.grad(f(x, b, r, seed), (x, b, r))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)

    # The public function (seed drawn inside the graph) compiles without breaks too.
    def h(x, b, r):
        return bias_dropout_add(x, b, r, 0.25).sum()

    gx, gb, gr = torch.autograd.grad(compile_fullgraph(h)(x, b, r), (x, b, r))
    assert torch.equal(gr, torch.ones_like(r))
    kept = gx != 0
    torch.testing.assert_close(gx[kept], torch.full_like(gx[kept], 1 / 0.75))


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 8, device=device)
    r = torch.randn(4, 8, device=device)
    s = _seed(0)
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: p is 1, expected a probability in \[0, 1\)"):
        _op(x, None, r, 1.0, s)
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: p is -0.1, expected a probability"):
        bias_dropout_add(x, None, r, -0.1)
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: residual has shape \[4, 7\], expected \[4, 8\]"):
        _op(x, None, r[:, :7], 0.1, s)
    with pytest.raises(TypeError, match=r"megacore\.bias_dropout_add: residual has dtype Half, expected Float"):
        _op(x, None, r.half(), 0.1, s)
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: bias has shape \[7\], expected \[8\]"):
        _op(x, torch.randn(7, device=device), r, 0.1, s)
    with pytest.raises(TypeError, match=r"megacore\.bias_dropout_add: bias has dtype Double, expected Float"):
        _op(x, torch.randn(8, device=device, dtype=torch.float64), r, 0.1, s)
    with pytest.raises(TypeError, match=r"megacore\.bias_dropout_add: x has dtype Long"):
        _op(torch.ones(4, 8, dtype=torch.long, device=device), None, r, 0.1, s)
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: x has 0 dims"):
        _op(torch.tensor(1.0, device=device), None, torch.tensor(1.0, device=device), 0.1, s)
    with pytest.raises(TypeError, match=r"megacore\.bias_dropout_add: seed has dtype Int, expected Long"):
        _op(x, None, r, 0.1, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: seed has 2 elements, expected 1"):
        _op(x, None, r, 0.1, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add_backward: p is 1.5"):
        torch.ops.megacore.bias_dropout_add_backward(x, 1.5, s, False)
    with pytest.raises(TypeError, match=r"megacore\.bias_dropout_add_backward: grad_out has dtype Long"):
        torch.ops.megacore.bias_dropout_add_backward(x.long(), 0.5, s, False)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"megacore\.bias_dropout_add: seed is on cuda:0, expected a CPU tensor"):
            _op(x, None, r, 0.1, s.cuda())
        if device == "cpu":
            with pytest.raises(ValueError, match=r"residual is on cuda"):
                _op(x, None, r.cuda(), 0.1, s)
