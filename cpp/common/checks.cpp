#include "common/checks.h"

#include <optional>
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

void check_devices(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args) {
  const std::string& full_name = schema.name();  // "megacore::bias_gelu"
  const size_t colons = full_name.find("::");
  const std::string op = colons == std::string::npos ? full_name : full_name.substr(colons + 2);
  std::optional<c10::Device> device;  // the first tensor argument's, and its name
  std::string device_of;
  std::optional<at::Tensor> seed;
  auto visit = [&](const std::string& name, const at::Tensor& t) {
    // A 0-dim CPU tensor is a host scalar that goes with any device, as in PyTorch's own ops (CUDA flash
    // attention returns its RNG seed and offset so, and they come back in transformer_layer's saved).
    if (!t.defined() || (t.dim() == 0 && t.is_cpu())) return;
    if (!device) {
      device = t.device();
      device_of = name;
      return;
    }
    MEGACORE_CHECK_ARG(t.device() == *device, op, name, " is on ", t.device(), ", expected ", *device,
                       " (the device of ", device_of, ")");
  };
  const auto& params = schema.arguments();
  for (size_t i = 0; i < params.size() && i < args.size(); ++i) {
    const std::string& name = params[i].name();
    const c10::IValue& v = args[i];
    if (name == "seed") {  // every schema's seed is a host value (registration.cpp)
      if (v.isTensor()) seed = v.toTensor();
    } else if (v.isTensor()) {
      visit(name, v.toTensor());
    } else if (v.isList()) {  // Tensor[] (and Tensor?[]): each element
      const auto list = v.toList();
      for (size_t k = 0; k < list.size(); ++k) {
        const c10::IValue e = list.get(k);
        if (e.isTensor()) visit(name + "[" + std::to_string(k) + "]", e.toTensor());
      }
    }
  }
  if (seed && seed->defined()) {
    // On meta nothing is computed, so a seed made under `with torch.device("meta")` is fine there.
    const bool ok = seed->is_cpu() || (seed->is_meta() && device && device->is_meta());
    MEGACORE_CHECK_ARG(ok, op, "seed is on ", seed->device(), ", expected cpu (a seed is read on the host)");
  }
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
