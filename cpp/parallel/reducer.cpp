// The data-parallel gradient reducer; see reducer.h. Registered as torch.classes.megacore.Reducer.
//
// Launch order: gloo and NCCL match collectives by their order on each rank, so every rank must launch
// the buckets in the same order. Buckets are launched strictly by index (bucket k only after k-1), and
// finalize() launches whatever is left in that same order, so the sequence is 0, 1, ..., n-1 on every
// rank whatever order the gradients arrive in, and however many parameters a rank left unused.
//
// Reduce-scatter mode: NCCL reduce-scatters in place (the output is this rank's slice of the input, which
// NCCL allows, as Megatron does); gloo gets a separate output buffer, copied into the slice by finalize(),
// since its in-place aliasing is not documented as safe.
#include "parallel/reducer.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>

#include "common/checks.h"
#include "parallel/group.h"

namespace megacore {
namespace {

constexpr const char* kOp = "parallel.DistributedDataParallel";
// Each parameter's view starts on a 64-byte boundary so vectorized kernels see aligned gradients.
constexpr int64_t kAlignBytes = 64;

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

}  // namespace

Reducer::Reducer(std::vector<at::Tensor> params, std::optional<at::ScalarType> grad_dtype, int64_t bucket_bytes,
                 std::string group_name, bool reduce_scatter, std::vector<int64_t> own_bucket)
    : reduce_scatter_(reduce_scatter) {
  MEGACORE_CHECK_ARG(!params.empty(), kOp, "the module has no parameter that requires grad: nothing to reduce");
  MEGACORE_CHECK_ARG(bucket_bytes >= 1, kOp, "bucket size is ", bucket_bytes, " bytes, expected >= 1");
  MEGACORE_CHECK_TYPE(!grad_dtype || at::isFloatingType(*grad_dtype), kOp, "grad_dtype ",
                      grad_dtype ? c10::toString(*grad_dtype) : "", " is not a floating dtype");
  pg_ = resolve_group(kOp, group_name);
  world_size_ = pg_->getSize();
  rank_ = pg_->getRank();

  // Assign parameters to buckets: one open bucket per (grad dtype, device), closed once it is full.
  struct Open {
    at::ScalarType dtype;
    at::Device device;
    int64_t bucket;
  };
  std::vector<Open> open;
  std::vector<at::TensorOptions> bucket_options;
  std::vector<int64_t> bucket_numel;
  offsets_.resize(params.size());
  bucket_of_.resize(params.size());
  std::vector<bool> alone(params.size(), false);
  for (int64_t i : own_bucket) {
    MEGACORE_CHECK_ARG(i >= 0 && i < static_cast<int64_t>(params.size()), kOp, "own_bucket index ", i,
                       " is out of range [0, ", params.size(), ")");
    alone[i] = true;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    MEGACORE_CHECK_ARG(p.defined(), kOp, "parameter ", i, " is undefined");
    MEGACORE_CHECK_TYPE(at::isFloatingType(p.scalar_type()), kOp, "parameter ", i, " has dtype ", p.scalar_type(),
                        "; only floating parameters have gradients");
    const at::ScalarType dtype = grad_dtype.value_or(p.scalar_type());
    auto it = std::find_if(open.begin(), open.end(),
                           [&](const Open& o) { return o.dtype == dtype && o.device == p.device(); });
    if (alone[i] && it != open.end()) {  // close the open bucket: this parameter starts one of its own
      open.erase(it);
      it = open.end();
    }
    if (it == open.end()) {
      open.push_back({dtype, p.device(), static_cast<int64_t>(buckets_.size())});
      it = open.end() - 1;
      buckets_.emplace_back();
      bucket_options.push_back(at::TensorOptions().dtype(dtype).device(p.device()));
      bucket_numel.push_back(0);
    }
    const int64_t b = it->bucket;
    const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
    offsets_[i] = round_up(bucket_numel[b], std::max<int64_t>(1, kAlignBytes / elem));
    bucket_numel[b] = offsets_[i] + p.numel();
    bucket_of_[i] = b;
    buckets_[b].params.push_back(static_cast<int64_t>(i));
    if (alone[i] || bucket_numel[b] * elem >= bucket_bytes) open.erase(it);
  }

  // One flat zeroed buffer per bucket; each parameter's gradient is a view into it.
  for (size_t b = 0; b < buckets_.size(); ++b) {
    Bucket& bucket = buckets_[b];
    int64_t numel = bucket_numel[b];
    if (reduce_scatter_) {
      // Every rank's slice has the same size and starts aligned.
      const int64_t elem = static_cast<int64_t>(c10::elementSize(bucket_options[b].dtype().toScalarType()));
      numel = round_up(numel, world_size_ * std::max<int64_t>(1, kAlignBytes / elem));
    }
    bucket.buffer = at::zeros({numel}, bucket_options[b]);  // [numel incl. padding]
    const int64_t shard = reduce_scatter_ ? numel / world_size_ : numel;
    bucket.shard_start = reduce_scatter_ ? rank_ * shard : 0;
    bucket.shard_end = bucket.shard_start + shard;
    if (reduce_scatter_ && bucket.buffer.device().type() != c10::DeviceType::CUDA) {
      bucket.shard_output = at::zeros({shard}, bucket_options[b]);  // [numel / world]
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    main_grads_.push_back(
        buckets_[bucket_of_[i]].buffer.narrow(0, offsets_[i], params[i].numel()).view(params[i].sizes()));
  }
  ready_.assign(params.size(), false);
  reset_backward_state();
}

void Reducer::check_param(const char* fn, int64_t param) const {
  MEGACORE_CHECK_ARG(param >= 0 && param < num_params(), kOp, "Reducer.", fn, ": parameter index ", param,
                     " is out of range [0, ", num_params(), ")");
}

void Reducer::check_bucket(const char* fn, int64_t bucket) const {
  MEGACORE_CHECK_ARG(bucket >= 0 && bucket < num_buckets(), kOp, "Reducer.", fn, ": bucket index ", bucket,
                     " is out of range [0, ", num_buckets(), ")");
}

void Reducer::mark_ready(int64_t param) {
  check_param("mark_ready", param);
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!ready_[param], "megacore.", kOp, ": parameter ", param,
              " was marked ready twice in one backward (is it used by two backward passes without a "
              "finalize in between, e.g. retain_graph?)");
  ready_[param] = true;
  --buckets_[bucket_of_[param]].pending;
  if (sync_) launch_in_order(/*everything=*/false);
}

void Reducer::launch_in_order(bool everything) {
  const int64_t n = num_buckets();
  while (next_launch_ < n && (everything || buckets_[next_launch_].pending == 0)) {
    launch(next_launch_++);
    if (!everything) ++num_launched_during_backward_;
  }
}

void Reducer::launch(int64_t b) {
  Bucket& bucket = buckets_[b];
  // SUM of grad / world is the mean; scaling first keeps bf16/fp16 sums in range.
  if (world_size_ > 1) bucket.buffer.div_(world_size_);
  if (reduce_scatter_) {
    at::Tensor output = bucket.shard_output.defined()
                            ? bucket.shard_output
                            : bucket.buffer.narrow(0, bucket.shard_start, bucket.shard_end - bucket.shard_start);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    bucket.work = pg_->reduce_scatter_single(output, bucket.buffer, opts);
  } else {
    std::vector<at::Tensor> tensors{bucket.buffer};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    bucket.work = pg_->allreduce(tensors, opts);
  }
  ++num_launched_;
}

void Reducer::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  // Unused parameters contribute their buffer's current (zero or accumulated) gradients: every rank
  // launches every bucket, so no rank waits for a collective its peers never start.
  if (sync_) launch_in_order(/*everything=*/true);
  std::exception_ptr error;
  for (size_t b = 0; b < buckets_.size() && !error; ++b) {
    if (!buckets_[b].work) continue;
    try {
      const std::string what = std::string(reduce_scatter_ ? "the gradient reduce-scatter" : "the gradient all-reduce") +
                               " of bucket " + std::to_string(b) + " of " + std::to_string(buckets_.size()) + " (" +
                               std::to_string(buckets_[b].params.size()) + " parameters)";
      wait_for(kOp, buckets_[b].work, pg_, buckets_[b].buffer.device().type(), what);
      if (buckets_[b].shard_output.defined()) {
        buckets_[b].buffer.narrow(0, buckets_[b].shard_start, buckets_[b].shard_output.numel())
            .copy_(buckets_[b].shard_output);
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  reset_backward_state();  // also after an error, so the next backward starts clean
  if (error) std::rethrow_exception(error);
}

void Reducer::reset_backward_state() {
  std::fill(ready_.begin(), ready_.end(), false);
  for (Bucket& bucket : buckets_) {
    bucket.pending = static_cast<int64_t>(bucket.params.size());
    bucket.work.reset();
  }
  next_launch_ = 0;
}

std::vector<int64_t> Reducer::params_not_ready() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < num_params(); ++i) {
    if (!ready_[i]) out.push_back(i);
  }
  return out;
}

at::Tensor Reducer::main_grad(int64_t param) const {
  check_param("main_grad", param);
  return main_grads_[param];
}

std::vector<at::Tensor> Reducer::main_grads() const { return main_grads_; }

void Reducer::zero_grad_buffers() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Bucket& bucket : buckets_) bucket.buffer.zero_();
}

void Reducer::set_sync(bool enabled) {
  std::lock_guard<std::mutex> lock(mutex_);
  sync_ = enabled;
}

bool Reducer::sync_enabled() const { return sync_; }

int64_t Reducer::num_params() const { return static_cast<int64_t>(main_grads_.size()); }

int64_t Reducer::num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

int64_t Reducer::world_size() const { return world_size_; }

int64_t Reducer::rank() const { return rank_; }

bool Reducer::reduce_scatter() const { return reduce_scatter_; }

std::vector<int64_t> Reducer::shard_range(int64_t bucket) const {
  check_bucket("shard_range", bucket);
  return {buckets_[bucket].shard_start, buckets_[bucket].shard_end};
}

int64_t Reducer::param_offset(int64_t param) const {
  check_param("param_offset", param);
  return offsets_[param];
}

int64_t Reducer::bucket_of(int64_t param) const {
  check_param("bucket_of", param);
  return bucket_of_[param];
}

std::vector<int64_t> Reducer::bucket_params(int64_t bucket) const {
  check_bucket("bucket_params", bucket);
  return buckets_[bucket].params;
}

std::vector<int64_t> Reducer::bucket_sizes_bytes() const {
  std::vector<int64_t> out;
  for (const Bucket& bucket : buckets_) out.push_back(bucket.buffer.numel() * bucket.buffer.element_size());
  return out;
}

at::Tensor Reducer::bucket_buffer(int64_t bucket) const {
  check_bucket("bucket_buffer", bucket);
  return buckets_[bucket].buffer;
}

int64_t Reducer::num_allreduces_launched() const { return num_launched_; }

int64_t Reducer::num_allreduces_launched_during_backward() const { return num_launched_during_backward_; }

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // Python: torch.classes.megacore.Reducer(params, grad_dtype, bucket_bytes, group_name, reduce_scatter,
  // own_bucket); used by
  // megacore.parallel.DistributedDataParallel, which owns the autograd hooks.
  m.class_<Reducer>("Reducer")
      .def(torch::init<std::vector<at::Tensor>, std::optional<at::ScalarType>, int64_t, std::string, bool,
                       std::vector<int64_t>>())
      .def("mark_ready", &Reducer::mark_ready)
      .def("finalize", &Reducer::finalize)
      .def("params_not_ready", &Reducer::params_not_ready)
      .def("main_grad", &Reducer::main_grad)
      .def("main_grads", &Reducer::main_grads)
      .def("zero_grad_buffers", &Reducer::zero_grad_buffers)
      .def("set_sync", &Reducer::set_sync)
      .def("sync_enabled", &Reducer::sync_enabled)
      .def("num_params", &Reducer::num_params)
      .def("num_buckets", &Reducer::num_buckets)
      .def("world_size", &Reducer::world_size)
      .def("rank", &Reducer::rank)
      .def("reduce_scatter", &Reducer::reduce_scatter)
      .def("shard_range", &Reducer::shard_range)
      .def("param_offset", &Reducer::param_offset)
      .def("bucket_of", &Reducer::bucket_of)
      .def("bucket_params", &Reducer::bucket_params)
      .def("bucket_sizes_bytes", &Reducer::bucket_sizes_bytes)
      .def("bucket_buffer", &Reducer::bucket_buffer)
      .def("num_allreduces_launched", &Reducer::num_allreduces_launched)
      .def("num_allreduces_launched_during_backward", &Reducer::num_allreduces_launched_during_backward);
}

}  // namespace megacore
