#pragma once
// \brief Shard arithmetic for tensor parallelism: even splits of a dimension across ranks.
//        Pure integer math (no torch tensors); exposed to Python through megacore._C (cpp/module.cpp).
//        Every bad argument raises c10::ValueError naming the function and the argument.
#include <cstdint>
#include <utility>

namespace megacore {
namespace shard {

/// \brief n / parts, or a ValueError when parts < 1, n < 0 or parts does not divide n.
int64_t divide(int64_t n, int64_t parts);

/// \brief The smallest multiple of k that is >= n (n >= 0, k >= 1).
int64_t pad_to_multiple(int64_t n, int64_t k);

/// \brief [start, end) of rank's piece of an even split of `size` into world_size pieces; size must be divisible.
std::pair<int64_t, int64_t> shard_range(int64_t size, int64_t rank, int64_t world_size);

/// \brief [start, end) of the vocab ids rank owns in a padded vocab (padded_vocab divisible by world_size).
std::pair<int64_t, int64_t> vocab_range(int64_t padded_vocab, int64_t rank, int64_t world_size);

}  // namespace shard
}  // namespace megacore
