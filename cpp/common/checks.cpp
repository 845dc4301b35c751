#include "common/checks.h"

#include <sstream>

namespace megacore {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  MEGACORE_CHECK_ARG(t.defined(), op, name, " is undefined");
  const auto dt = t.scalar_type();
  MEGACORE_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, name,
                      " has dtype ", dt, ", expected float32, float64, float16 or bfloat16");
}

void check_same_dtype_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                             const at::Tensor& other) {
  MEGACORE_CHECK_TYPE(t.scalar_type() == other.scalar_type(), op, name, " has dtype ", t.scalar_type(),
                      ", expected ", other.scalar_type(), " (the dtype of ", other_name, ")");
  check_same_device(op, name, t, other_name, other);
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                       const at::Tensor& other) {
  MEGACORE_CHECK_ARG(t.device() == other.device(), op, name, " is on ", t.device(), ", expected ", other.device(),
                     " (the device of ", other_name, ")");
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t size, const char* what) {
  MEGACORE_CHECK_ARG(t.dim() == 1 && t.size(0) == size, op, name, " has shape ", shape_str(t.sizes()),
                     ", expected [", size, "] (", what, ")");
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                      const at::Tensor& other) {
  MEGACORE_CHECK_ARG(t.sizes() == other.sizes(), op, name, " has shape ", shape_str(t.sizes()), ", expected ",
                     shape_str(other.sizes()), " (the shape of ", other_name, ")");
}

void check_min_dim(const char* op, const char* name, const at::Tensor& t, int64_t min_dim, const char* layout) {
  MEGACORE_CHECK_ARG(t.dim() >= min_dim, op, name, " has ", t.dim(), " dims (shape ", shape_str(t.sizes()),
                     "), expected at least ", min_dim, ": ", layout);
}

void check_probability(const char* op, const char* name, double p) {
  MEGACORE_CHECK_ARG(p >= 0.0 && p < 1.0, op, name, " is ", p, ", expected a probability in [0, 1)");
}

}  // namespace megacore
