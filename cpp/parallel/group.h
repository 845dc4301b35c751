#pragma once
// \brief Process groups by name, for C++ code that issues collectives (collectives.cpp, reducer.cpp).
//        The group travels as its registered name (`group.group_name` in Python) and is resolved here
//        with c10d::resolve_process_group, the pattern of torch's functional collectives. On CPU every
//        wait is bounded by the group's own timeout, so a rank that skips a collective makes its peers
//        raise instead of hanging forever; on CUDA the wait is stream-ordered (parallel/wait.h).
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <string>

namespace megacore {

/// \brief The wait bound when the backend does not expose its options: 300 s, like torch's default.
constexpr std::chrono::milliseconds kDefaultGroupTimeout{300 * 1000};

/// \brief The process group registered under `group_name`, or a ValueError naming `op` ("megacore.<op>: ...").
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const char* op, const std::string& group_name);

/// \brief The group's timeout for tensors on `device` (the `timeout=` of init_process_group/new_group),
///        or kDefaultGroupTimeout if the backend hides it.
std::chrono::milliseconds group_timeout(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, c10::DeviceType device);

/// \brief Waits for `work` as parallel/wait.h says for `device`: at most the group's timeout on CPU, stream-ordered
///        on CUDA. Raises a RuntimeError naming `op`, `what` (e.g. "the
///        collective"), the group ("group 'NAME' DESC") and its timeout ("timeout N ms") if it failed or did not
///        finish in time (megacore.parallel.timeouts parses those two to say which collective stalled).
void wait_for(const char* op, const c10::intrusive_ptr<c10d::Work>& work,
              const c10::intrusive_ptr<c10d::ProcessGroup>& pg, c10::DeviceType device,
              const std::string& what = "the collective");

}  // namespace megacore
