"""T5's learned, bucketed relative-position bias: one table ``[num_buckets, heads]`` per stack, looked up by the
bucket of each (query, key) distance and added to the self-attention scores of every layer of the stack (the
layers take it as ``attention_bias``; its gradient flows back into the table through the C++ layer's bias
gradient).

Buckets, as in T5 (Mesh TensorFlow, and transformers' ``T5Attention._relative_position_bucket``): the relative
position is ``key - query``. Bidirectional (an encoder), half the buckets are for keys after the query. Of each
half, the first ``num_buckets / 2`` (of the half) are exact distances 0, 1, ...; the rest cover distances up to
``max_distance`` in logarithmically wider bins, and every farther distance shares the last bucket. Causal (a
decoder) uses every bucket for keys at or before the query; keys after it share bucket 0 with distance 0, and the
causal mask removes them.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from megacore.parallel import state
from megacore.parallel.layers import INIT_STD
from megacore.parallel.placement import place


def relative_position_buckets(query_len: int, key_len: int, bidirectional: bool, num_buckets: int = 32,
                              max_distance: int = 128, query_start: int = 0, device=None) -> torch.Tensor:
    """The bucket ``[query_len, key_len]`` (int64, in ``[0, num_buckets)``) of each query at positions
    ``[query_start, query_start + query_len)`` and each key at ``[0, key_len)``."""
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"megacore.models.relative_position_buckets: num_buckets={num_buckets} must be >= "
                         f"{4 if bidirectional else 2}")
    query = torch.arange(query_start, query_start + query_len, dtype=torch.long, device=device)[:, None]
    key = torch.arange(key_len, dtype=torch.long, device=device)[None, :]
    relative = key - query
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # log-spaced bins past the exact ones (fp32 math as in T5; distances below `exact` take the exact bucket, and
    # are clamped here only so that the unused branch never takes log(0))
    far = distance.clamp(min=exact).float()
    log_bucket = exact + (torch.log(far / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A stack's relative-position bias: ``forward(query_len, key_len, query_start=0)`` -> ``[1, heads / tp,
    query_len, key_len]`` in the table's dtype, for the layers' ``attention_bias``.

    The table ``weight`` is ``[num_buckets, heads / tp]``: under tensor parallelism each rank holds the columns
    of its heads (the layer's attention heads are split the same way), so no communication is needed. Every
    rank draws the full fp32 table from the default generator and keeps its columns, so any tensor-parallel
    size builds the same bias from the same seed.
    """

    def __init__(self, num_heads: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128,
                 tensor_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 init_std: float = INIT_STD, device=None):
        super().__init__()
        for name, value in (("num_heads", num_heads), ("num_buckets", num_buckets), ("max_distance", max_distance)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"megacore.models.RelativePositionBias: {name}={value!r} must be an int >= 1")
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(f"megacore.models.RelativePositionBias: max_distance={max_distance} must exceed the "
                             f"exact buckets ({num_buckets // (4 if bidirectional else 2)})")
        relative_position_buckets(1, 1, bidirectional, num_buckets, max_distance)  # checks num_buckets
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        world, rank = 1, 0
        if tensor_parallel:
            grid = state.require_tensor_parallel("megacore.models.RelativePositionBias", {"num_heads": num_heads},
                                                 config_flag=True)
            world, rank = grid.tensor_parallel_size, grid.tensor_parallel_rank
        master = torch.empty(num_buckets, num_heads, dtype=torch.float32).normal_(0.0, init_std)
        local = master.chunk(world, dim=1)[rank]
        self.weight = nn.Parameter(local.to(device=device, dtype=params_dtype).contiguous())
        place(self, "weight", 1 if tensor_parallel else None)

    def forward(self, query_len: int, key_len: int, query_start: int = 0) -> torch.Tensor:
        buckets = relative_position_buckets(query_len, key_len, self.bidirectional, self.num_buckets,
                                            self.max_distance, query_start, self.weight.device)
        return nn.functional.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)  # [1, heads, q, k]

    def extra_repr(self) -> str:
        return (f"buckets={self.num_buckets}, max_distance={self.max_distance}, "
                f"{'bidirectional' if self.bidirectional else 'causal'}, heads={self.weight.shape[1]}")


__all__ = ["RelativePositionBias", "relative_position_buckets"]
