// Dataset index builders; see helpers.h. The loops follow Megatron-LM's helpers.cpp so indices built
// here select exactly the samples Megatron would, but every input is checked first: a bad index is a
// ValueError, never an out-of-bounds read.
#include "data/helpers.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace megacore {
namespace data {

#define MEGACORE_DATA_CHECK(cond, fn, ...) TORCH_CHECK_VALUE(cond, "megacore.data.", fn, ": ", __VA_ARGS__)

int64_t document_index_tokens(const int64_t* sizes, int64_t num_sizes, const int64_t* document_index,
                              int64_t num_documents) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_documents; ++i) {
    const int64_t d = document_index[i];
    MEGACORE_DATA_CHECK(d >= 0 && d < num_sizes, "build_sample_index", "document_index[", i, "] = ", d,
                        " is outside the ", num_sizes, " document sizes");
    MEGACORE_DATA_CHECK(sizes[d] >= 0, "build_sample_index", "sizes[", d, "] = ", sizes[d], " is negative");
    MEGACORE_DATA_CHECK(total <= std::numeric_limits<int64_t>::max() - sizes[d], "build_sample_index",
                        "the document index holds more than 2^63 tokens");
    total += sizes[d];
  }
  return total;
}

int64_t num_samples_for(int64_t total_tokens, int64_t seq_length, bool drop_last_partial_sequence,
                        int64_t add_extra_token) {
  MEGACORE_DATA_CHECK(seq_length >= 1, "build_sample_index", "seq_length must be >= 1, got ", seq_length);
  MEGACORE_DATA_CHECK(add_extra_token == 0 || add_extra_token == 1, "build_sample_index",
                      "add_extra_token_to_sequence must be 0 or 1, got ", add_extra_token);
  MEGACORE_DATA_CHECK(total_tokens >= 0, "build_sample_index", "total tokens must be >= 0, got ", total_tokens);
  // The last sample needs add_extra_token tokens beyond its seq_length (the next one's first token).
  const int64_t usable = total_tokens - add_extra_token;
  if (usable <= 0) return 0;
  return drop_last_partial_sequence ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

void build_sample_index(const int64_t* sizes, const int64_t* document_index, int64_t num_documents,
                        int64_t seq_length, int64_t add_extra_token, int64_t num_samples, int64_t* sample_index) {
  int64_t position = 0;  // into document_index
  int64_t offset = 0;    // token offset in the document at `position`
  sample_index[0] = 0;
  sample_index[1] = 0;
  for (int64_t sample = 1; sample <= num_samples; ++sample) {
    int64_t remaining = seq_length + add_extra_token;
    while (remaining != 0) {
      const int64_t document_length = sizes[document_index[position]] - offset;
      remaining -= document_length;
      if (remaining <= 0) {
        // The sample ends inside this document; the next one starts add_extra_token tokens before that end,
        // so consecutive samples share one token (input of one, label of the other).
        offset += remaining + document_length - add_extra_token;
        remaining = 0;
      } else if (position == num_documents - 1) {
        // Out of documents: only the last, partial sample (drop_last_partial_sequence=false) may get here.
        MEGACORE_DATA_CHECK(sample == num_samples, "build_sample_index", "the documents hold too few tokens for ",
                            num_samples, " samples (ran out at sample ", sample, ")");
        offset = sizes[document_index[position]] - add_extra_token;
        break;
      } else {
        ++position;
        offset = 0;
      }
    }
    sample_index[2 * sample] = position;
    sample_index[2 * sample + 1] = offset;
  }
}

void check_blending_weights(const double* weights, int64_t num_datasets, int64_t size) {
  MEGACORE_DATA_CHECK(num_datasets >= 1 && num_datasets <= std::numeric_limits<int16_t>::max(),
                      "build_blending_indices", "need 1 to 32767 datasets (int16 dataset index), got ", num_datasets);
  MEGACORE_DATA_CHECK(size >= 0, "build_blending_indices", "size must be >= 0, got ", size);
  for (int64_t i = 0; i < num_datasets; ++i) {
    // A zero weight would tie with a dataset whose count is exactly on target and, being first, win it.
    MEGACORE_DATA_CHECK(std::isfinite(weights[i]) && weights[i] > 0, "build_blending_indices", "weights[", i,
                        "] = ", weights[i], "; every weight must be finite and > 0 (leave unused datasets out)");
  }
}

void build_blending_indices(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                            int64_t* dataset_sample_index) {
  double sum = 0;
  for (int64_t i = 0; i < num_datasets; ++i) sum += weights[i];
  std::vector<double> normalized(num_datasets);
  for (int64_t i = 0; i < num_datasets; ++i) normalized[i] = weights[i] / sum;
  std::vector<int64_t> counts(num_datasets, 0);
  for (int64_t sample = 0; sample < size; ++sample) {
    // Megatron uses max(sample, 1) so the first pick already follows the weights (all errors 0 otherwise).
    const double n = std::max(static_cast<double>(sample), 1.0);
    int64_t best = 0;
    double best_error = normalized[0] * n - static_cast<double>(counts[0]);
    for (int64_t d = 1; d < num_datasets; ++d) {
      const double error = normalized[d] * n - static_cast<double>(counts[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[sample] = static_cast<int16_t>(best);
    dataset_sample_index[sample] = counts[best]++;
  }
}

int64_t check_blending_sizes(const int64_t* sizes, int64_t num_datasets) {
  MEGACORE_DATA_CHECK(num_datasets >= 1 && num_datasets <= std::numeric_limits<int16_t>::max(),
                      "build_exhaustive_blending_indices", "need 1 to 32767 datasets (int16 dataset index), got ",
                      num_datasets);
  int64_t total = 0;
  for (int64_t i = 0; i < num_datasets; ++i) {
    MEGACORE_DATA_CHECK(sizes[i] >= 0, "build_exhaustive_blending_indices", "sizes[", i, "] = ", sizes[i],
                        " is negative");
    total += sizes[i];
  }
  MEGACORE_DATA_CHECK(total > 0, "build_exhaustive_blending_indices", "sizes sum to 0");
  return total;
}

void build_exhaustive_blending_indices(const int64_t* sizes, int64_t num_datasets, int16_t* dataset_index,
                                       int64_t* dataset_sample_index) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_datasets; ++i) total += sizes[i];
  std::vector<double> weights(num_datasets);
  std::vector<int64_t> counts(num_datasets, 0);
  std::vector<int64_t> unspent;  // ascending, like Megatron's std::set: ties go to the lower dataset
  for (int64_t i = 0; i < num_datasets; ++i) {
    weights[i] = static_cast<double>(sizes[i]) / static_cast<double>(total);
    // Megatron keeps empty datasets in the set and never spends them (an endless loop); we skip them.
    if (sizes[i] > 0) unspent.push_back(i);
  }
  for (int64_t sample = 0; !unspent.empty(); ++sample) {
    const double n = std::max(static_cast<double>(sample), 1.0);
    size_t best_slot = 0;
    double best_error = std::numeric_limits<double>::lowest();
    for (size_t slot = 0; slot < unspent.size(); ++slot) {
      const int64_t d = unspent[slot];
      const double error = weights[d] * n - static_cast<double>(counts[d]);
      if (error > best_error) {
        best_error = error;
        best_slot = slot;
      }
    }
    const int64_t best = unspent[best_slot];
    dataset_index[sample] = static_cast<int16_t>(best);
    dataset_sample_index[sample] = counts[best]++;
    if (counts[best] == sizes[best]) unspent.erase(unspent.begin() + static_cast<std::ptrdiff_t>(best_slot));
  }
}

}  // namespace data
}  // namespace megacore
