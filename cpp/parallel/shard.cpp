// Shard arithmetic for tensor parallelism. Kept in C++ so the C++ side (checkpoint resharding, kernels
// that need a shard's offset) and Python share one definition and one set of error messages.
#include "parallel/shard.h"

#include "common/checks.h"

namespace megacore {
namespace shard {
namespace {

void check_world(const char* fn, int64_t rank, int64_t world_size) {
  MEGACORE_CHECK_ARG(world_size >= 1, fn, "world_size=", world_size, " must be >= 1");
  MEGACORE_CHECK_ARG(rank >= 0 && rank < world_size, fn, "rank=", rank, " is not in [0, world_size=", world_size,
                     ")");
}

}  // namespace

int64_t divide(int64_t n, int64_t parts) {
  MEGACORE_CHECK_ARG(parts >= 1, "divide", "parts=", parts, " must be >= 1");
  MEGACORE_CHECK_ARG(n >= 0, "divide", "n=", n, " must be >= 0");
  MEGACORE_CHECK_ARG(n % parts == 0, "divide", "n=", n, " is not divisible by parts=", parts);
  return n / parts;
}

int64_t pad_to_multiple(int64_t n, int64_t k) {
  MEGACORE_CHECK_ARG(k >= 1, "pad_to_multiple", "k=", k, " must be >= 1");
  MEGACORE_CHECK_ARG(n >= 0, "pad_to_multiple", "n=", n, " must be >= 0");
  return (n + k - 1) / k * k;
}

std::pair<int64_t, int64_t> shard_range(int64_t size, int64_t rank, int64_t world_size) {
  check_world("shard_range", rank, world_size);
  MEGACORE_CHECK_ARG(size >= 0, "shard_range", "size=", size, " must be >= 0");
  MEGACORE_CHECK_ARG(size % world_size == 0, "shard_range", "size=", size,
                     " is not divisible by world_size=", world_size);
  const int64_t per = size / world_size;
  return {rank * per, (rank + 1) * per};
}

std::pair<int64_t, int64_t> vocab_range(int64_t padded_vocab, int64_t rank, int64_t world_size) {
  check_world("vocab_range", rank, world_size);
  MEGACORE_CHECK_ARG(padded_vocab >= 0, "vocab_range", "padded_vocab=", padded_vocab, " must be >= 0");
  MEGACORE_CHECK_ARG(padded_vocab % world_size == 0, "vocab_range", "padded_vocab=", padded_vocab,
                     " is not divisible by world_size=", world_size, " (pad it with pad_to_multiple first)");
  const int64_t per = padded_vocab / world_size;
  return {rank * per, (rank + 1) * per};
}

}  // namespace shard
}  // namespace megacore
