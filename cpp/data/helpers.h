#pragma once
// \brief Dataset index builders (Megatron-LM's helpers.cpp semantics), compiled into the wheel instead of
//        JIT-built at run time. Plain C++ on raw pointers: no torch, no Python; cpp/module.cpp binds them
//        to numpy arrays and releases the GIL around the loops. Every bad argument raises c10::ValueError
//        ("megacore.data.<function>: ..."), which the bindings turn into Python's ValueError.
//        python/megacore/data/index_reference.py holds pure-Python implementations of the same semantics.
#include <cstdint>

namespace megacore {
namespace data {

/// \brief Sum of sizes[document_index[i]] over the index, checking every entry is in [0, num_sizes) and every
///        size it names is >= 0. Called before build_sample_index so the walk can never leave its arrays.
int64_t document_index_tokens(const int64_t* sizes, int64_t num_sizes, const int64_t* document_index,
                              int64_t num_documents);

/// \brief How many samples of seq_length (+ add_extra_token) tokens total_tokens yields: floor when the last
///        partial sample is dropped, ceil otherwise (Megatron's formula, integer arithmetic).
int64_t num_samples_for(int64_t total_tokens, int64_t seq_length, bool drop_last_partial_sequence,
                        int64_t add_extra_token);

/// \brief Fills sample_index [num_samples + 1, 2] (row-major int64) with (position in document_index, token
///        offset in that document) of the start of each sample; row num_samples is where the last one ends.
///        Each sample has seq_length + add_extra_token tokens, the next one starting add_extra_token tokens
///        before the previous ends. Documents are sizes[document_index[i]] tokens long; the inputs must have
///        passed document_index_tokens, and num_samples must come from num_samples_for over its total.
void build_sample_index(const int64_t* sizes, const int64_t* document_index, int64_t num_documents,
                        int64_t seq_length, int64_t add_extra_token, int64_t num_samples, int64_t* sample_index);

/// \brief Megatron's greedy blending: for each of `size` global samples, the dataset whose count lags its
///        weight the most (weights normalised by their sum, all > 0), and that dataset's running sample
///        number. dataset_index [size] int16, dataset_sample_index [size] int64.
void build_blending_indices(const double* weights, int64_t num_datasets, int64_t size, int16_t* dataset_index,
                            int64_t* dataset_sample_index);

/// \brief Exhaustive blending: every dataset i contributes exactly sizes[i] samples, interleaved by the same
///        greedy rule with weights sizes[i] / sum(sizes). Output arrays have sum(sizes) entries.
void build_exhaustive_blending_indices(const int64_t* sizes, int64_t num_datasets, int16_t* dataset_index,
                                       int64_t* dataset_sample_index);

/// \brief Argument checks for the blending builders (positive finite weights, at most 32767 datasets), run
///        while the GIL is still held so the error reaches Python before any allocation.
void check_blending_weights(const double* weights, int64_t num_datasets, int64_t size);
/// \brief Same for exhaustive blending; returns sum(sizes).
int64_t check_blending_sizes(const int64_t* sizes, int64_t num_datasets);

}  // namespace data
}  // namespace megacore
