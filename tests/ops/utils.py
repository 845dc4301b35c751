"""Shared pieces of the op tests: devices, dtypes, tolerances, and the standard checks every op gets
(reference comparison, opcheck, torch.compile, gradcheck)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (atol, rtol) for a result of this dtype against a float64 reference computed from the same inputs:
# a few units of the dtype's rounding, since one rounding of the output is unavoidable.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

device_params = pytest.mark.parametrize("device", DEVICES)
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg: str = ""):
    """Compare ``actual`` with a float64 ``expected`` at ``dtype``'s tolerance times ``scale`` (for
    results that are sums over many rounded terms)."""
    atol, rtol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol * scale, msg=msg or None
    )


def as_double_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 copy of t that requires grad (None stays None)."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def leaf(shape, dtype, device, requires_grad=True, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float32, device=device) * scale).to(dtype).requires_grad_(requires_grad)


def compile_fullgraph(fn):
    """torch.compile(fullgraph=True) on a fresh dynamo cache, so one test's graphs never serve another."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)
