// The `megacore` op namespace: its owner (TORCH_LIBRARY, once) and define_op, with which every op family
// (cpp/ops/<family>.cpp, cpp/transformer/layer.cpp) defines its schemas in a TORCH_LIBRARY_FRAGMENT. The
// table of every file that registers into the namespace is in docs/architecture.md.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "common/checks.h"
#include "ops/op.h"

namespace megacore::ops {
namespace {

// Every op checks that its tensors share one device at BackendSelect, before a kernel is picked from the
// tensors' devices. The highest backend among them wins, and Meta ranks above CPU and CUDA: without this,
// one meta tensor among CPU ones runs the fake kernel, which returns uninitialized CPU memory, and the
// CPU kernel never sees the meta tensor to reject it.
void check_devices_then_dispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  check_devices(schema, torch::jit::last(*stack, schema.arguments().size()));
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
                     stack);
}

}  // namespace

void define_op(torch::Library& m, const char* schema) {
  m.def(schema);
  const std::string name(schema, std::strchr(schema, '('));
  m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::BackendSelect,
                                       torch::CppFunction::makeFromBoxedFunction<&check_devices_then_dispatch>()));
}

}  // namespace megacore::ops

// The namespace's owner. Its ops are defined by the fragments of the files in docs/architecture.md's table;
// claiming the name here makes a second library that defines `megacore` fail at load time.
TORCH_LIBRARY(megacore, m) {}
