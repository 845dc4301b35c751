"""Small helpers shared by the op wrappers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: fp64 for fp64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
