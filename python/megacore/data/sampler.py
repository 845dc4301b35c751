"""Distributed, resumable batch samplers (Megatron's MegatronPretrainingSampler and its random variant).

Both yield lists of sample indices, one micro-batch of this data-parallel rank at a time, so they plug
into ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler)``. A global step takes
``micro_batch_size * data_parallel_size`` samples; rank r takes its micro-batch from each.

Resuming: a sampler built with ``consumed_samples=c`` yields exactly the micro-batches an uninterrupted
sampler would yield after handing out c samples (c counts global samples: all ranks, all micro-batches).
The samplers advance ``consumed_samples`` as they hand batches out, but with a DataLoader that prefetches
they run ahead of training: checkpoint the count of samples the trainer actually consumed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PretrainingSampler", "RandomPretrainingSampler"]


def _check(fn: str, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
           data_parallel_size: int) -> None:
    if total_samples < 0:
        raise ValueError(f"{fn}: total_samples must be >= 0, got {total_samples}")
    if micro_batch_size < 1:
        raise ValueError(f"{fn}: micro_batch_size must be >= 1, got {micro_batch_size}")
    if data_parallel_size < 1:
        raise ValueError(f"{fn}: data_parallel_size must be >= 1, got {data_parallel_size}")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"{fn}: data_parallel_rank must be in [0, {data_parallel_size}), got {data_parallel_rank}")
    if consumed_samples < 0:
        raise ValueError(f"{fn}: consumed_samples must be >= 0, got {consumed_samples}")


class PretrainingSampler:
    """Samples in order: global step k takes [c + k*M*D, c + (k+1)*M*D); rank r its r-th slice of M.

    Args:
        total_samples: dataset length. consumed_samples: global samples already used (c).
        micro_batch_size (M), data_parallel_rank (r), data_parallel_size (D).
        drop_last: drop a last global step with fewer than M*D samples (default). Without it, each rank gets
            its part of that step, when non-empty (so ranks may then differ by one micro-batch).

    Yields list[int] of length M. Raises ValueError for bad sizes and consumed_samples > total_samples.
    """

    def __init__(self, total_samples: int, consumed_samples: int = 0, micro_batch_size: int = 1,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, drop_last: bool = True):
        fn = "megacore.data.PretrainingSampler"
        _check(fn, total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples > total_samples:
            raise ValueError(f"{fn}: consumed_samples ({consumed_samples}) exceeds total_samples ({total_samples})")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = bool(drop_last)

    @property
    def global_step_samples(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def _local_slice(self, step_start: int) -> tuple[int, int]:
        begin = step_start + self.data_parallel_rank * self.micro_batch_size
        return begin, min(begin + self.micro_batch_size, self.total_samples)

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_step_samples)
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            full += 1
        return full

    def __iter__(self):
        step = self.global_step_samples
        while self.consumed_samples < self.total_samples:
            start = self.consumed_samples
            if start + step > self.total_samples and self.drop_last:
                return
            begin, end = self._local_slice(start)
            self.consumed_samples = min(start + step, self.total_samples)
            if begin < end:
                yield list(range(begin, end))

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(self.total_samples, int(state["consumed_samples"]), self.micro_batch_size,
                      self.data_parallel_rank, self.data_parallel_size, self.drop_last)


class RandomPretrainingSampler:
    """A fresh permutation each epoch, seeded by (seed, epoch); resumable at any global step.

    An epoch is the largest multiple of M*D samples (the rest is skipped that epoch); consumed_samples
    c gives the epoch (c // epoch_size) and the position in it. Two ways to shard:

    - data_sharding=True (default, Megatron's): rank r draws only from its own contiguous bucket
      [r*B, (r+1)*B), B = epoch_size / D, permuted; good locality for memory-mapped data.
    - data_sharding=False: one permutation of the whole epoch; rank r takes elements r, r+D, r+2D, ...

    One ``iter()`` runs to the end of the current epoch; the next ``iter()`` starts the next epoch (a
    DataLoader re-iterates it once per epoch). Yields list[int] of length M. Raises ValueError for bad
    sizes, a dataset smaller than one global step, or consumed_samples not a multiple of M*D.
    """

    def __init__(self, total_samples: int, consumed_samples: int = 0, micro_batch_size: int = 1,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1, seed: int = 0,
                 data_sharding: bool = True):
        fn = "megacore.data.RandomPretrainingSampler"
        _check(fn, total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        step = micro_batch_size * data_parallel_size
        if total_samples < step:
            raise ValueError(f"{fn}: total_samples ({total_samples}) is smaller than one global step "
                             f"(micro_batch_size * data_parallel_size = {step})")
        if consumed_samples % step:
            raise ValueError(f"{fn}: consumed_samples ({consumed_samples}) must be a multiple of "
                             f"micro_batch_size * data_parallel_size = {step} (resume at a step boundary)")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.seed = int(seed)
        self.data_sharding = bool(data_sharding)

    @property
    def epoch_size(self) -> int:
        """Samples used per epoch: total_samples rounded down to a multiple of M*D."""
        step = self.micro_batch_size * self.data_parallel_size
        return self.total_samples // step * step

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.epoch_size

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _local_order(self) -> np.ndarray:
        # This rank's remaining indices of the current epoch, in the order they are handed out.
        epoch, position = divmod(self.consumed_samples, self.epoch_size)
        D, r = self.data_parallel_size, self.data_parallel_rank
        if self.data_sharding:
            bucket = self.epoch_size // D
            # Every rank has taken position / D samples of its bucket so far.
            return r * bucket + self._permutation(epoch, bucket)[position // D:]
        return self._permutation(epoch, self.epoch_size)[position:][r::D]

    def __len__(self) -> int:
        """Micro-batches this rank yields until the end of the current epoch."""
        return (self.epoch_size - self.consumed_samples % self.epoch_size) // (
            self.micro_batch_size * self.data_parallel_size)

    def __iter__(self):
        order = self._local_order()
        M, step = self.micro_batch_size, self.micro_batch_size * self.data_parallel_size
        for begin in range(0, len(order) - M + 1, M):
            self.consumed_samples += step
            yield order[begin:begin + M].tolist()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"megacore.data.RandomPretrainingSampler: the state has seed {state['seed']}, "
                             f"this sampler {self.seed}: resuming would change the order")
        self.__init__(self.total_samples, int(state["consumed_samples"]), self.micro_batch_size,
                      self.data_parallel_rank, self.data_parallel_size, self.seed, self.data_sharding)
