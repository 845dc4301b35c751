#include "common.cuh"

namespace megacore::cuda {

int64_t column_partial_rows(int64_t rows) {
  const int64_t lanes = (rows + kColTileY * 16 - 1) / (kColTileY * 16);  // ~16 rows per thread
  return lanes < 1 ? 1 : (lanes > kMaxPartialRows ? kMaxPartialRows : lanes);
}

}  // namespace megacore::cuda
