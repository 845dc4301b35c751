"""Row reductions stay right on very long rows.

A row of 2^31 + a few elements used to come out wrong without an error: the CPU kernels summed a row in
the fp32 lanes of a few vectors, and an fp32 lane stops growing at 2^24 when it adds values near 1, so
cross_entropy's logsumexp and rms_norm's mean square lost most of the row. Long rows are now summed in
blocks of kSumBlock = 2^16 elements (cpp/kernels/cpu/vec.h) whose sums are added in double; indices are int64
throughout. The fast tests cross block boundaries at moderate sizes against float64 references; the slow
ones run rows of 2^31 + 5 bf16 elements (4 GiB a tensor, at most two alive) against closed forms.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import megacore
from megacore.ops import reference
from tests.ops.utils import assert_close

BLOCK = 1 << 16  # kSumBlock in cpp/kernels/cpu/vec.h
MODERATE = 3 * BLOCK + 5  # three whole blocks and a tail shorter than a vector
HUGE = 2**31 + 5  # past int32: an index kept in 32 bits wraps before the row's end


def _moderate_rows(shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, MODERATE, generator=gen) + shift


def _double_leaves(*ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


# ---- fast: rows of several blocks, against float64 references ----------------------------------------------


def test_layer_norm_rows_of_several_blocks_match_the_reference_forward_and_backward():
    x, w, b = _moderate_rows(0.5).requires_grad_(), torch.randn(MODERATE).requires_grad_(), torch.randn(MODERATE)
    b.requires_grad_()
    out = megacore.ops.layer_norm(x, w, b, 1e-5)
    xd, wd, bd = _double_leaves(x, w, b)
    ref = reference.layer_norm(xd, wd, bd, 1e-5)
    assert_close(out, ref, torch.float32, msg="layer_norm forward")
    g = torch.randn_like(out)
    for name, actual, expected in zip(["x", "weight", "bias"], torch.autograd.grad(out, [x, w, b], g),
                                      torch.autograd.grad(ref, [xd, wd, bd], g.double())):
        assert_close(actual, expected, torch.float32, scale=10, msg=f"layer_norm grad {name}")


def test_rms_norm_rows_of_several_blocks_match_the_reference_forward_and_backward():
    x, w = _moderate_rows(0.5).requires_grad_(), torch.randn(MODERATE).requires_grad_()
    out = megacore.ops.rms_norm(x, w, 1e-6)
    xd, wd = _double_leaves(x, w)
    ref = reference.rms_norm(xd, wd, 1e-6)
    assert_close(out, ref, torch.float32, msg="rms_norm forward")
    g = torch.randn_like(out)
    for name, actual, expected in zip(["x", "weight"], torch.autograd.grad(out, [x, w], g),
                                      torch.autograd.grad(ref, [xd, wd], g.double())):
        assert_close(actual, expected, torch.float32, scale=10, msg=f"rms_norm grad {name}")


def test_cross_entropy_rows_of_several_blocks_match_the_reference_forward_and_backward():
    logits = (_moderate_rows() * 4).requires_grad_()
    target = torch.tensor([MODERATE - 1, 3])  # one target in the tail, one in the first block
    loss = megacore.ops.cross_entropy(logits, target)
    (ld,) = _double_leaves(logits)
    ref = reference.cross_entropy(ld, target)
    assert_close(loss, ref, torch.float32, msg="cross_entropy forward")
    g = torch.tensor([1.0, 0.5])
    (actual,), (expected,) = torch.autograd.grad(loss, [logits], g), torch.autograd.grad(ref, [ld], g.double())
    assert_close(actual, expected, torch.float32, msg="cross_entropy grad logits")


def test_softmax_rows_of_several_blocks_match_the_reference_forward_and_backward():
    scores = _moderate_rows().reshape(1, 1, 2, MODERATE).requires_grad_()
    probs = megacore.ops.scaled_masked_softmax(scores, None, 0.5)
    (sd,) = _double_leaves(scores)
    ref = reference.scaled_masked_softmax(sd, None, 0.5)
    assert_close(probs, ref, torch.float32, msg="softmax forward")
    g = torch.randn_like(probs)
    (actual,), (expected,) = torch.autograd.grad(probs, [scores], g), torch.autograd.grad(ref, [sd], g.double())
    assert_close(actual, expected, torch.float32, msg="softmax grad scores")


def test_bias_gradient_over_more_than_64_blocks_of_rows_matches_the_reference():
    # Column sums over rows (bias and norm-weight gradients) go in 64 chunks, or one per kSumBlock rows
    # when there are more: here 66.
    rows = 65 * BLOCK + 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 2, generator=gen).requires_grad_()
    bias = torch.randn(2, generator=gen).requires_grad_()
    out = megacore.ops.bias_gelu(x, bias)
    xd, bd = _double_leaves(x, bias)
    ref = reference.bias_gelu(xd, bd)
    g = torch.randn(rows, 2, generator=gen)
    (actual,), (expected,) = torch.autograd.grad(out, [bias], g), torch.autograd.grad(ref, [bd], g.double())
    assert_close(actual, expected, torch.float32, scale=100, msg="bias_gelu grad bias")  # a sum of 4M rounded terms


# ---- slow: one row of 2^31 + 5 elements, against closed forms ----------------------------------------------


@pytest.fixture
def free_memory_after():
    yield
    gc.collect()


@pytest.mark.slow
def test_cross_entropy_on_a_row_of_2_to_the_31_plus_5_elements(free_memory_after):
    # Zeros but for two logits, one of them past index 2^31: the loss and the gradient have closed forms.
    logits = torch.zeros(1, HUGE, dtype=torch.bfloat16)
    logits[0, 7], logits[0, HUGE - 1] = 3.0, 5.0
    z = (HUGE - 2) + math.exp(3.0) + math.exp(5.0)  # sum of exp(logits)
    loss, lse = torch.ops.megacore.cross_entropy(logits, torch.tensor([7]), -100)
    assert lse.item() == pytest.approx(math.log(z), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(z) - 3.0, rel=1e-6)

    grad = torch.ops.megacore.cross_entropy_backward(torch.ones(1), logits, torch.tensor([7]), lse, 0, -100)
    del logits
    # grad = softmax - onehot(7), rounded to bf16 (8 bits).
    expected = {0: 1 / z, 7: math.exp(3.0) / z - 1, 2**31: 1 / z, HUGE - 1: math.exp(5.0) / z}
    for i, e in expected.items():
        assert grad[0, i].item() == pytest.approx(e, rel=1e-2), f"grad_logits[0, {i}]"


@pytest.mark.slow
def test_rms_norm_on_a_row_of_2_to_the_31_plus_5_elements(free_memory_after):
    # Ones but for the last element, past index 2^31: mean square (HUGE + 3) / HUGE.
    x = torch.ones(1, HUGE, dtype=torch.bfloat16)
    x[0, HUGE - 1] = 2.0
    eps = 1e-6
    out, rstd = torch.ops.megacore.rms_norm(x, None, eps)
    del x
    expected_rstd = 1 / math.sqrt((HUGE + 3) / HUGE + eps)
    assert rstd.item() == pytest.approx(expected_rstd, rel=1e-6)
    for i, xi in {0: 1.0, 2**31 - 1: 1.0, 2**31: 1.0, HUGE - 1: 2.0}.items():
        assert out[0, i].item() == pytest.approx(xi * expected_rstd, rel=1e-2), f"out[0, {i}]"


@pytest.mark.slow
def test_softmax_on_a_row_whose_vector_lanes_would_pass_2_to_the_24(free_memory_after):
    # 3 * 2^28 elements: 3 * 2^24 per lane of one 16-lane fp32 vector, where a lane alone stops at 2^24.
    # (2^31 elements would need 16 GiB here: scores, probabilities and the fp32 row buffer.)
    n = 3 * 2**28
    scores = torch.zeros(1, 1, 1, n, dtype=torch.bfloat16)
    scores[..., n - 1] = 2.0  # scaled by 0.5: logit 1
    probs = torch.ops.megacore.scaled_masked_softmax(scores, None, 0.5)
    del scores
    z = (n - 1) + math.e
    for i, e in {0: 1 / z, n // 2: 1 / z, n - 1: math.e / z}.items():
        assert probs[0, 0, 0, i].item() == pytest.approx(e, rel=1e-2), f"probs[..., {i}]"
