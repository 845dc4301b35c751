"""megacore.ops.cross_entropy (and its backward and vocab-parallel stats) against F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from megacore.ops import reference
from megacore.ops.cross_entropy import cross_entropy, cross_entropy_backward, vocab_parallel_cross_entropy_stats
from tests.ops.utils import assert_close, compile_fullgraph, device_params, dtype_params, leaf

VOCAB = [1, 3, 127, 1000, 4097, 50257]
index_params = pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])


def _targets(shape, vocab, device, index_dtype=torch.int64, ignore_index=-100, ignored_every=3):
    t = torch.randint(0, vocab, shape, device=device)
    t.view(-1)[::ignored_every] = ignore_index  # some ignored tokens
    return t.to(index_dtype)


def _check(logits, target, ignore_index=-100, grad_scale=1.0):
    """Loss, lse and grad of megacore vs F.cross_entropy in float64 over the same (rounded) logits."""
    dtype = logits.dtype
    loss, lse = torch.ops.megacore.cross_entropy(logits.detach(), target, ignore_index)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and lse.dtype == acc and loss.shape == target.shape and lse.shape == target.shape

    x = logits.detach().requires_grad_()
    out = cross_entropy(x, target, ignore_index)
    grad = torch.randn_like(out) * grad_scale
    out.backward(grad)

    xd = logits.detach().double().requires_grad_()
    ref = reference.cross_entropy(xd, target, ignore_index)
    ref.backward(grad.double())
    valid = target != ignore_index

    # Outputs are fp32 computed from exact inputs: fp32 tolerance whatever the logits' dtype.
    assert_close(out, ref, torch.float32, scale=2.0, msg="loss")
    assert_close(lse[valid], torch.logsumexp(xd.detach(), -1)[valid], torch.float32, scale=2.0, msg="lse")
    assert torch.isfinite(lse).all()
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_close(x.grad, xd.grad, dtype, msg="grad logits")
    assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))


@pytest.mark.isa
@device_params
@dtype_params
@index_params
@pytest.mark.parametrize("vocab", VOCAB)
def test_matches_reference_over_vocab_sizes(device, dtype, index_dtype, vocab):
    tokens = 6 if vocab > 4097 else 11
    logits = leaf((tokens, vocab), dtype, device, requires_grad=False, scale=3.0)
    _check(logits, _targets((tokens,), vocab, device, index_dtype))


@pytest.mark.isa
@device_params
@dtype_params
def test_leading_dims_custom_ignore_index_and_non_contiguous(device, dtype):
    # [2, 5, vocab] with class 0 ignored; logits strided in the vocab dim, target transposed.
    logits = leaf((2, 5, 2 * 333), dtype, device, requires_grad=False, scale=2.0)[..., ::2]
    target = _targets((5, 2), 333, device, ignore_index=0).t()
    assert not logits.is_contiguous() and not target.is_contiguous()
    _check(logits, target, ignore_index=0)
    _check(logits, _targets((2, 5), 333, device), ignore_index=-100)


@device_params
def test_extreme_logits(device):
    # Large magnitudes (the max must be subtracted) and -inf entries (masked vocab), fp32.
    logits = torch.randn(4, 3000, device=device) * 40
    logits[:, 2500:] = float("-inf")
    logits[1, :2100] = float("-inf")  # the first chunks of a row are all -inf
    target = torch.tensor([5, 2200, 2499, -100], device=device)
    _check(logits, target)


@device_params
@dtype_params
def test_nan_logit_gives_nan_loss_and_grad_row(device, dtype):
    logits = torch.randn(3, 5000, device=device).to(dtype)
    logits[1, 4321] = float("nan")
    logits = logits.requires_grad_()
    loss = cross_entropy(logits, torch.tensor([1, 2, 3], device=device))
    loss.sum().backward()
    assert loss.isnan().tolist() == [False, True, False]
    assert logits.grad[1].isnan().all() and not logits.grad[[0, 2]].isnan().any()


@device_params
def test_all_ignored_and_empty_batch(device):
    logits = torch.randn(4, 37, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    loss = cross_entropy(logits, target)
    loss.backward(torch.ones(4, device=device))
    assert torch.equal(loss, torch.zeros(4, device=device))
    assert torch.equal(logits.grad, torch.zeros_like(logits))

    empty = torch.randn(0, 37, device=device, requires_grad=True)
    loss = cross_entropy(empty, torch.empty(0, dtype=torch.long, device=device))
    loss.sum().backward()
    assert loss.shape == (0,) and empty.grad.shape == (0, 37)
    stats = vocab_parallel_cross_entropy_stats(empty.detach(), torch.empty(0, dtype=torch.long, device=device), 0)
    assert all(s.shape == (0,) for s in stats)


@device_params
def test_gradcheck_float64(device):
    logits = torch.randn(5, 13, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 12, -100, 7, 3], device=device)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, target), (logits,))


@pytest.mark.isa
@device_params
@dtype_params
@pytest.mark.parametrize("vocab_start", [0, 40, 1000])
def test_stats_match_reference(device, dtype, vocab_start):
    logits = leaf((9, 257), dtype, device, requires_grad=False, scale=3.0)
    target = torch.randint(0, 1300, (9,), device=device)  # global ids, most outside this shard
    target[::3] = torch.randint(vocab_start, vocab_start + 257, (3,), device=device)
    target[4] = -100
    got = vocab_parallel_cross_entropy_stats(logits, target, vocab_start)
    want = reference.vocab_parallel_cross_entropy_stats(logits.double(), target, vocab_start)
    for name, g, w in zip(["max", "sum_exp", "target_logit"], got, want):
        assert g.dtype == torch.float32 and g.shape == (9,)
        assert_close(g, w, torch.float32, scale=2.0, msg=name)


@device_params
@dtype_params
@pytest.mark.parametrize("shards", [2, 3])
def test_vocab_parallel_shards_reproduce_the_full_loss_and_grad(device, dtype, shards):
    vocab, tokens = 1001, 13
    logits = leaf((tokens, vocab), dtype, device, requires_grad=False, scale=3.0)
    target = _targets((tokens,), vocab, device, ignored_every=5)
    bounds = [vocab * k // shards for k in range(shards + 1)]  # uneven shards

    # What a tensor-parallel layer does with all-reduces: MAX of the maxes, SUM of the rescaled sums
    # and of the target logits.
    stats = [
        vocab_parallel_cross_entropy_stats(logits[:, b0:b1], target, b0) for b0, b1 in zip(bounds, bounds[1:])
    ]
    gmax = torch.stack([s[0] for s in stats]).amax(0)
    gsum = sum(s[1] * torch.exp(s[0] - gmax) for s in stats)
    tlogit = sum(s[2] for s in stats)
    lse = gmax + torch.log(gsum)
    loss = torch.where(target != -100, lse - tlogit, torch.zeros_like(lse))

    full_loss, full_lse = torch.ops.megacore.cross_entropy(logits, target, -100)
    assert_close(loss, full_loss.double(), torch.float32, scale=2.0, msg="sharded loss")
    assert_close(lse, full_lse.double(), torch.float32, scale=2.0, msg="sharded lse")

    grad_loss = torch.randn(tokens, device=device)
    full_grad = cross_entropy_backward(grad_loss, logits, target, full_lse)
    for b0, b1 in zip(bounds, bounds[1:]):
        shard_grad = cross_entropy_backward(grad_loss, logits[:, b0:b1], target, lse, b0)
        assert shard_grad.shape == (tokens, b1 - b0) and shard_grad.dtype == dtype
        assert_close(shard_grad, full_grad[:, b0:b1].double(), dtype, msg=f"grad of shard [{b0}, {b1})")


@device_params
def test_opcheck(device):
    logits = torch.randn(6, 33, device=device, requires_grad=True)
    target = torch.tensor([1, 0, -100, 32, 5, 7], device=device)
    torch.library.opcheck(torch.ops.megacore.cross_entropy.default, (logits, target, -100))
    torch.library.opcheck(torch.ops.megacore.cross_entropy.default, (logits, target.clamp(min=0).int(), 0))
    _, lse = torch.ops.megacore.cross_entropy(logits.detach(), target, -100)
    g = torch.randn(6, device=device)
    torch.library.opcheck(torch.ops.megacore.cross_entropy_backward.default, (g, logits.detach(), target, lse, 0, -100))
    torch.library.opcheck(torch.ops.megacore.cross_entropy_backward.default, (g, logits.detach(), target, lse, 10, 0))
    torch.library.opcheck(torch.ops.megacore.vocab_parallel_cross_entropy_stats.default, (logits.detach(), target, 16, -100))


@device_params
def test_torch_compile_fullgraph_forward_and_backward(device):
    def f(x, t):
        return cross_entropy(x * 2, t).sum()

    x = torch.randn(8, 65, device=device, requires_grad=True)
    t = torch.tensor([0, 64, -100, 3, 9, 10, 11, 12], device=device)
    (got,) = torch.autograd.grad(compile_fullgraph(f)(x, t), (x,))
    (want,) = torch.autograd.grad(f(x, t), (x,))
    torch.testing.assert_close(got, want)


@device_params
def test_bad_input_names_the_op_and_argument(device):
    x = torch.randn(4, 10, device=device)
    t = torch.tensor([1, 2, 3, 4], device=device)
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy: target has value 10 at flat index 2, expected "
                       r"a class in \[0, 10\) \(vocab size 10\) or ignore_index \(-100\)"):
        cross_entropy(x, torch.tensor([1, 2, 10, 4], device=device))
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy: target has value -1 at flat index 0, .*"
                       r"vocab size 10"):
        cross_entropy(x, torch.tensor([-1, 2, 3, 4], device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy: target has value -100 .*ignore_index \(0\)"):
        cross_entropy(x, torch.tensor([-100, 2, 3, 4], device=device), ignore_index=0)
    with pytest.raises(TypeError, match=r"megacore\.cross_entropy: target has dtype Float, expected int64 or int32"):
        cross_entropy(x, t.float())
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy: target has shape \[5\], expected \[4\] "
                       r"\(the leading shape of logits \[4, 10\]\)"):
        cross_entropy(x, torch.tensor([1, 2, 3, 4, 5], device=device))
    with pytest.raises(TypeError, match=r"megacore\.cross_entropy: logits has dtype Long"):
        cross_entropy(torch.ones(4, 10, dtype=torch.long, device=device), t)
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy: logits has shape \[4, 0\], expected a vocab"):
        cross_entropy(torch.ones(4, 0, device=device), t)
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy_backward: grad_loss has shape \[3\], expected \[4\]"):
        cross_entropy_backward(torch.ones(3, device=device), x, t, torch.ones(4, device=device))
    with pytest.raises(ValueError, match=r"megacore\.cross_entropy_backward: lse has shape \[4, 1\], expected \[4\]"):
        cross_entropy_backward(torch.ones(4, device=device), x, t, torch.ones(4, 1, device=device))
    with pytest.raises(ValueError, match=r"megacore\.vocab_parallel_cross_entropy_stats: target has shape \[4, 1\]"):
        vocab_parallel_cross_entropy_stats(x, t[:, None], 0)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"target is on cuda"):
            cross_entropy(x, t.cuda())
