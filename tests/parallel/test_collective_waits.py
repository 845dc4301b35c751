"""Which wait megacore's collectives and the DDP reducer use per device (cpp/parallel/wait.h): bounded by the
group's timeout on CPU (gloo), stream-ordered on CUDA (NCCL), so the host never blocks on the GPU inside a
tensor-parallel layer or a DDP bucket. The bounded path's behaviour (a skipped collective raises after the
timeout) is tested in test_collectives.py and tests/reliability/test_distributed.py."""

import socket

import pytest
import torch
import torch.distributed as dist

import megacore._C as C


def test_cpu_collectives_wait_bounded_and_cuda_collectives_are_stream_ordered():
    assert C.collective_wait("cpu") == "bounded"
    assert C.collective_wait("cuda") == "stream-ordered"
    assert C.collective_wait("cuda:1") == "stream-ordered"
    with pytest.raises(ValueError, match="collective_wait: device 'gpu' is not a device name"):
        C.collective_wait("gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_a_cuda_all_reduce_returns_before_the_gpu_has_run_it(monkeypatch):
    """NCCL, world 1: with the stream busy (a sleep kernel queued first), megacore's all_reduce returns to the
    host while its result is not yet computed; the stream orders it, and the value is right afterwards."""
    from megacore.parallel.collectives import all_reduce

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles ahead of the collective on this stream
        y = all_reduce(x, dist.group.WORLD, "sum")
        done = torch.cuda.Event()
        done.record()
        assert not done.query(), "the host waited for the GPU: the all_reduce was not stream-ordered"
        torch.cuda.synchronize()
        torch.testing.assert_close(y, torch.arange(1 << 20, device="cuda", dtype=torch.float32))
    finally:
        dist.destroy_process_group()
