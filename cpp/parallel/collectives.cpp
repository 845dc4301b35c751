// Collectives as torch ops: megacore::all_reduce / all_gather / reduce_scatter.
//
// The group travels as its registered name (`group.group_name` in Python) and is resolved here with
// c10d::resolve_process_group, the pattern of torch's functional collectives: a string schema argument
// works in eager and under torch.compile(fullgraph=True), the TorchBind ProcessGroup type does not.
// One implementation for every device (CompositeExplicitAutograd): the process group dispatches to
// its backend (gloo on CPU, NCCL on CUDA). The ops are out-of-place and have no autograd formula;
// python/megacore/parallel/mappings.py gives them one per tensor-parallel mapping.
//
// Timeouts (parallel/group.h): the collective is issued with the group's own timeout (the `timeout=` of
// init_process_group/new_group, which gloo and NCCL enforce themselves), and we wait on the Work with
// that same timeout, or kDefaultGroupTimeout (300 s) when the backend does not expose its options. A rank
// that skips a collective therefore makes its peers raise instead of hanging forever.
#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/checks.h"
#include "parallel/group.h"

namespace megacore {
namespace {

/// \brief The reduction named by `reduce_op` (sum|avg|max|min).
c10d::ReduceOp parse_reduce_op(const std::string& reduce_op) {
  if (reduce_op == "sum") return c10d::ReduceOp::SUM;
  if (reduce_op == "avg") return c10d::ReduceOp::AVG;
  if (reduce_op == "max") return c10d::ReduceOp::MAX;
  if (reduce_op == "min") return c10d::ReduceOp::MIN;
  MEGACORE_CHECK_ARG(false, "all_reduce", "reduce_op '", reduce_op, "' is not one of sum, avg, max, min");
  return c10d::ReduceOp::SUM;  // unreachable
}

/// \brief Out-of-place all-reduce of `x` over the group: same shape as `x`.
at::Tensor all_reduce(const at::Tensor& x, const std::string& group_name, const std::string& reduce_op) {
  const char* op = "all_reduce";
  MEGACORE_CHECK_ARG(x.defined(), op, "x is undefined");
  c10d::AllreduceOptions opts;
  opts.reduceOp = parse_reduce_op(reduce_op);
  auto pg = resolve_group(op, group_name);
  std::vector<at::Tensor> tensors{x.contiguous().clone()};  // the backend reduces in place
  wait_for(op, pg->allreduce(tensors, opts), pg, x.device().type());
  return tensors[0];
}

/// \brief Concatenation of every rank's `x` along `dim`: [..., n, ...] -> [..., world * n, ...].
at::Tensor all_gather(const at::Tensor& x, int64_t dim, const std::string& group_name) {
  const char* op = "all_gather";
  MEGACORE_CHECK_ARG(x.defined() && x.dim() >= 1, op, "x must have at least 1 dimension");
  dim = at::maybe_wrap_dim(dim, x.dim());
  auto pg = resolve_group(op, group_name);
  // The backend gathers along dim 0 of contiguous buffers: move `dim` to the front and back.
  at::Tensor input = x.movedim(dim, 0).contiguous();  // [n, rest...]
  auto out_shape = input.sizes().vec();
  out_shape[0] *= pg->getSize();
  at::Tensor output = input.new_empty(out_shape);  // [world * n, rest...]
  wait_for(op, pg->all_gather_single(output, input), pg, x.device().type());
  return output.movedim(0, dim).contiguous();
}

/// \brief Sum over ranks, then this rank's chunk along `dim`: [..., world * n, ...] -> [..., n, ...].
at::Tensor reduce_scatter(const at::Tensor& x, int64_t dim, const std::string& group_name) {
  const char* op = "reduce_scatter";
  MEGACORE_CHECK_ARG(x.defined() && x.dim() >= 1, op, "x must have at least 1 dimension");
  dim = at::maybe_wrap_dim(dim, x.dim());
  auto pg = resolve_group(op, group_name);
  const int64_t world = pg->getSize();
  MEGACORE_CHECK_ARG(x.size(dim) % world == 0, op, "x has size ", x.size(dim), " along dim ", dim,
                     " (shape ", shape_str(x.sizes()), "), not divisible by the group size ", world);
  at::Tensor input = x.movedim(dim, 0).contiguous();  // [world * n, rest...]
  auto out_shape = input.sizes().vec();
  out_shape[0] /= world;
  at::Tensor output = input.new_empty(out_shape);  // [n, rest...]
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  wait_for(op, pg->reduce_scatter_single(output, input, opts), pg, x.device().type());
  return output.movedim(0, dim).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // Out-of-place all-reduce over the group named `group_name` (Python: group.group_name);
  // reduce_op: sum | avg | max | min.
  m.def("all_reduce(Tensor x, str group_name, str reduce_op=\"sum\") -> Tensor");
  // Every rank's x concatenated along dim, in rank order.
  m.def("all_gather(Tensor x, int dim, str group_name) -> Tensor");
  // Sum over ranks, then this rank's chunk along dim (x.size(dim) must divide by the group size).
  m.def("reduce_scatter(Tensor x, int dim, str group_name) -> Tensor");
}

TORCH_LIBRARY_IMPL(megacore, CompositeExplicitAutograd, m) {
  m.impl("all_reduce", &all_reduce);
  m.impl("all_gather", &all_gather);
  m.impl("reduce_scatter", &reduce_scatter);
}

}  // namespace megacore
