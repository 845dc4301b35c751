#pragma once
// \brief Types shared by the CUDA launchers and the torch glue that calls them. No torch headers,
//        no CUDA device code: host code of any compiler can include this.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace megacore::cuda {

/// \brief The element types a launcher accepts; the glue maps torch dtypes onto it.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

/// \brief Rows of fp32 partial sums a column reduction over `rows` rows writes (see column_partial_rows
///        in common.cuh); the glue allocates a [column_partial_rows(rows), cols] workspace.
int64_t column_partial_rows(int64_t rows);

}  // namespace megacore::cuda
