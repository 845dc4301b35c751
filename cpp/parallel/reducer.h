#pragma once
// \brief The data-parallel gradient reducer behind megacore.parallel.DistributedDataParallel.
//
//        Parameters' gradients live in a few contiguous flat buffers ("buckets"). During backward a
//        per-parameter hook calls mark_ready(i); as soon as every gradient of a bucket is ready the
//        bucket is pre-scaled by 1/world and its all-reduce (SUM) is launched asynchronously, so the
//        communication overlaps the rest of backward. finalize() (queued to run when backward ends)
//        launches what is left and waits for everything, bounded by the group's timeout.
//
//        Reduce-scatter mode (ZeRO-1, megacore.training.DistributedOptimizer): each bucket is padded to a
//        multiple of world * alignment and, instead of the all-reduce, launches a reduce-scatter (same
//        pre-scaling, same order), so that after finalize() this rank's contiguous 1/world slice of the
//        bucket, [shard_range(b)[0], shard_range(b)[1]), holds the averaged gradient of those elements; the
//        rest of the bucket is left unspecified (this rank's local, pre-scaled sum).
//
//        Exposed to Python as the TorchBind class torch.classes.megacore.Reducer: tensors cross
//        natively and the process group travels by name, resolved here (parallel/group.h).
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/custom_class.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace megacore {

class Reducer : public torch::CustomClassHolder {
 public:
  /// \brief Buckets `params` in the given order (reverse registration order: backward makes the last
  ///        layers' gradients first). A bucket closes once it holds >= `bucket_bytes`; parameters of
  ///        a different grad dtype or device never share one. Gradients have dtype `grad_dtype`
  ///        (nullopt: each parameter's dtype). `group_name` names the data-parallel group. With
  ///        `reduce_scatter` each bucket is reduce-scattered instead of all-reduced (see the file comment).
  ///        Parameters listed in `own_bucket` (indices) each get a bucket of their own, so that two models
  ///        holding copies of one parameter (the tied word embedding on the first and last pipeline stage)
  ///        slice its gradient alike under reduce-scatter, whatever else they hold.
  Reducer(std::vector<at::Tensor> params, std::optional<at::ScalarType> grad_dtype, int64_t bucket_bytes,
          std::string group_name, bool reduce_scatter, std::vector<int64_t> own_bucket);

  /// \brief Records that parameter `param`'s gradient for this backward is in its bucket view; launches
  ///        every bucket that is now complete, in bucket order (when sync is enabled).
  void mark_ready(int64_t param);

  /// \brief Ends a backward: launches the buckets not launched yet (when sync is enabled), waits for
  ///        every launched all-reduce (reduce-scatter) at most the group's timeout and resets the
  ///        per-backward state.
  void finalize();

  /// \brief Indices of the parameters not marked ready in the current backward.
  std::vector<int64_t> params_not_ready() const;

  /// \brief Parameter `param`'s gradient: a view, shaped like the parameter, into its bucket's buffer.
  at::Tensor main_grad(int64_t param) const;

  /// \brief Every parameter's main_grad, in parameter order.
  std::vector<at::Tensor> main_grads() const;

  /// \brief Zeroes every bucket buffer (hence every main_grad) in place.
  void zero_grad_buffers();

  /// \brief Enables or disables the all-reduce; disabled (no_sync), gradients only accumulate.
  void set_sync(bool enabled);

  /// \brief Whether backward ends with an all-reduce.
  bool sync_enabled() const;

  /// \brief Number of parameters given at construction.
  int64_t num_params() const;

  /// \brief Number of buckets.
  int64_t num_buckets() const;

  /// \brief The data-parallel group's size.
  int64_t world_size() const;

  /// \brief This process's rank in the data-parallel group.
  int64_t rank() const;

  /// \brief Whether buckets are reduce-scattered (true) or all-reduced (false).
  bool reduce_scatter() const;

  /// \brief [start, end): the elements of `bucket`'s buffer this rank's reduce-scatter averages, i.e.
  ///        rank * n / world .. (rank + 1) * n / world for a bucket of n (padded) elements. Without
  ///        reduce-scatter, the whole buffer [0, n).
  std::vector<int64_t> shard_range(int64_t bucket) const;

  /// \brief Where parameter `param`'s gradient starts in its bucket's buffer (in elements).
  int64_t param_offset(int64_t param) const;

  /// \brief The bucket holding parameter `param`.
  int64_t bucket_of(int64_t param) const;

  /// \brief The parameters in `bucket`, in bucketing order.
  std::vector<int64_t> bucket_params(int64_t bucket) const;

  /// \brief Each bucket buffer's size in bytes (alignment padding, and reduce-scatter padding, included).
  std::vector<int64_t> bucket_sizes_bytes() const;

  /// \brief Bucket `bucket`'s flat gradient buffer.
  at::Tensor bucket_buffer(int64_t bucket) const;

  /// \brief Bucket reductions (all-reduces, or reduce-scatters in that mode) launched since construction.
  int64_t num_allreduces_launched() const;

  /// \brief Bucket reductions launched from mark_ready, i.e. before backward ended (the overlap).
  int64_t num_allreduces_launched_during_backward() const;

 private:
  struct Bucket {
    at::Tensor buffer;            // [padded numel], the flat gradients
    at::Tensor shard_output;      // [numel / world], the reduce-scatter's output when not in place (gloo)
    int64_t shard_start = 0, shard_end = 0;  // this rank's slice of buffer (reduce-scatter mode)
    std::vector<int64_t> params;  // parameter indices, in bucketing order
    int64_t pending = 0;          // gradients not ready yet in this backward
    c10::intrusive_ptr<c10d::Work> work;  // the in-flight all-reduce (reduce-scatter), if launched
  };

  /// \brief Launches buckets in index order from next_launch_: only complete ones, or all if `everything`.
  void launch_in_order(bool everything);

  /// \brief Pre-scales bucket `b` by 1/world and launches its asynchronous SUM all-reduce (reduce-scatter).
  void launch(int64_t b);

  /// \brief Back to "nothing ready, nothing launched" for the next backward.
  void reset_backward_state();

  void check_param(const char* fn, int64_t param) const;
  void check_bucket(const char* fn, int64_t bucket) const;

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int64_t world_size_ = 1;
  int64_t rank_ = 0;
  bool reduce_scatter_ = false;
  std::vector<Bucket> buckets_;
  std::vector<int64_t> bucket_of_;      // per parameter
  std::vector<int64_t> offsets_;        // per parameter: its gradient's first element in its bucket
  std::vector<at::Tensor> main_grads_;  // per parameter
  std::vector<bool> ready_;             // per parameter, this backward
  int64_t next_launch_ = 0;             // buckets [0, next_launch_) are launched this backward
  bool sync_ = true;
  int64_t num_launched_ = 0;
  int64_t num_launched_during_backward_ = 0;
  mutable std::mutex mutex_;  // autograd may run hooks of different devices on different threads
};

}  // namespace megacore
