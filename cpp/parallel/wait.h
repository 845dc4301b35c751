#pragma once
// \brief How the C++ collectives and the DDP reducer wait for their work, per device (group.cpp's wait_for):
//        - CPU tensors (gloo): the issuing thread blocks, bounded by the group's timeout, and raises naming
//          the collective if it expires (a rank that skipped the collective cannot hang its peers).
//        - CUDA tensors (NCCL): stream-ordered. The current stream waits on the work's completion event and
//          the host runs ahead to queue the next kernels; a timed wait would block the CPU thread until the
//          GPU finished, serializing the host with the device in every tensor-parallel layer and DDP bucket.
//          Hang detection is then NCCL's watchdog, configured from the same process-group timeout.
//        Kept free of c10d headers so the pybind module can report it (megacore._C.collective_wait).
#include <c10/core/Device.h>

namespace megacore {

enum class CollectiveWait { kBounded, kStreamOrdered };

/// \brief The wait used for collectives on tensors of `device`.
inline CollectiveWait collective_wait(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? CollectiveWait::kStreamOrdered : CollectiveWait::kBounded;
}

/// \brief "bounded" or "stream-ordered".
inline const char* collective_wait_name(CollectiveWait wait) {
  return wait == CollectiveWait::kStreamOrdered ? "stream-ordered" : "bounded";
}

}  // namespace megacore
