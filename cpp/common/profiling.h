#pragma once
// \brief Named phases of C++ code (the transformer layer's qkv, attention, ...) for the profilers: a torch
//        RecordFunction scope, seen by torch.profiler on every device, and with CUDA an NVTX range, seen by
//        Nsight Systems / Compute. Names follow the launchers' NVTX ranges: "megacore.<op>.<phase>".
#include <ATen/record_function.h>

#ifdef MEGACORE_WITH_CUDA
#include <nvtx3/nvToolsExt.h>
#endif

#include <string_view>

namespace megacore {

/// \brief Marks the enclosing scope as the phase `name` (a string literal: it must outlive the scope).
/// Cheap when nothing profiles: the RecordFunction checks a thread-local flag and records nothing, and an
/// NVTX push/pop with no tool attached is a call into a stub.
class ProfilePhase {
 public:
  explicit ProfilePhase(const char* name) : record_(at::RecordScope::USER_SCOPE) {
    if (record_.isActive()) record_.before(std::string_view(name), c10::ArrayRef<const c10::IValue>{});
#ifdef MEGACORE_WITH_CUDA
    nvtxRangePushA(name);
#endif
  }
  ~ProfilePhase() {
#ifdef MEGACORE_WITH_CUDA
    nvtxRangePop();
#endif
  }
  ProfilePhase(const ProfilePhase&) = delete;
  ProfilePhase& operator=(const ProfilePhase&) = delete;

 private:
  at::RecordFunction record_;  // ends its scope in its destructor, after the NVTX pop
};

}  // namespace megacore
