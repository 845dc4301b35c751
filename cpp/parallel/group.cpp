// Process groups by name and bounded waits; see group.h.
#include "parallel/group.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include "common/checks.h"
#include "parallel/wait.h"

namespace megacore {

c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const char* op, const std::string& group_name) {
  try {
    return c10d::resolve_process_group(group_name);
  } catch (const c10::Error&) {
    MEGACORE_CHECK_ARG(false, op, "group_name '", group_name,
                       "' names no registered process group (pass group.group_name of a live group)");
  }
  return {};  // unreachable
}

std::chrono::milliseconds group_timeout(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, c10::DeviceType device) {
  try {
    auto opts = pg->getBackend(device)->getBackendOptions();
    if (opts && opts->timeout.count() > 0) return opts->timeout;
  } catch (const c10::Error&) {
    // Backend without getBackendOptions: fall back to the default.
  }
  return kDefaultGroupTimeout;
}

void wait_for(const char* op, const c10::intrusive_ptr<c10d::Work>& work,
              const c10::intrusive_ptr<c10d::ProcessGroup>& pg, c10::DeviceType device, const std::string& what) {
  const auto timeout = group_timeout(pg, device);
  // The group's name and timeout go into the message in a fixed form ("group 'NAME' ..., timeout N ms"):
  // megacore.parallel.timeouts reads them back to name the group and the ranks that did not arrive.
  const std::string group = "group '" + pg->getGroupName() + "' " + pg->getGroupDesc();
  bool done = false;
  try {
    if (collective_wait(device) == CollectiveWait::kStreamOrdered) {
      // NCCL: makes the current stream wait on the collective and returns at once (unless the user turned on
      // TORCH_NCCL_BLOCKING_WAIT); a stuck collective is the watchdog's to report after the group's timeout.
      done = work->wait();
    } else {
      done = work->wait(timeout);
    }
  } catch (const c10::Error& e) {  // without the C++ backtrace: the message is what a user reads
    TORCH_CHECK(false, "megacore.", op, ": ", what, " failed or timed out (", group, ", timeout ", timeout.count(),
                " ms; did every rank of the group call it with matching shapes?): ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "megacore.", op, ": ", what, " failed or timed out (", group, ", timeout ", timeout.count(),
                " ms; did every rank of the group call it with matching shapes?): ", e.what());
  }
  TORCH_CHECK(done, "megacore.", op, ": ", what, " did not finish within the group timeout (", group, ", timeout ",
              timeout.count(), " ms); did every rank of the group call it?");
}

}  // namespace megacore
