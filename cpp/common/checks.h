#pragma once
// \brief Argument checks of the op families (cpp/ops/) and the layer. Every message names the op and the argument:
//        "megacore.layer_norm: weight has shape [511], expected [512] (the input's last dim)".
#include <ATen/core/Tensor.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <string>

namespace megacore {

// A shape-or-value problem with an argument: ValueError in Python.
#define MEGACORE_CHECK_ARG(cond, op, ...) TORCH_CHECK_VALUE(cond, "megacore.", op, ": ", __VA_ARGS__)
// A dtype problem: TypeError in Python.
#define MEGACORE_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "megacore.", op, ": ", __VA_ARGS__)

/// \brief The tensor must be defined and of a floating dtype megacore computes in (fp32, fp64, fp16, bf16).
void check_float_tensor(const char* op, const char* name, const at::Tensor& t);

/// \brief `t` must have `other`'s dtype and device.
void check_same_dtype_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                             const at::Tensor& other);

/// \brief `t` must be on `other`'s device (dtype free).
void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                       const at::Tensor& other);

/// \brief `t` must be 1-D of length `size`; `what` explains where `size` comes from.
void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t size, const char* what);

/// \brief Every tensor argument of a call (Tensor, Tensor?, each element of Tensor[]) must be on the device of
///        the first one, except 0-dim CPU tensors (host scalars) and `seed`, which is read on the host and
///        must be on CPU (or on meta when the op runs on meta). `args` are the call's arguments in
///        `schema`'s order (a boxed call's stack).
///        "megacore.bias_gelu: bias is on meta, expected cpu (the device of x)".
void check_devices(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args);

/// \brief `t` must have exactly `other`'s shape.
void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                      const at::Tensor& other);

/// \brief `t` must have at least `min_dim` dimensions; `layout` names them ("[..., hidden]").
void check_min_dim(const char* op, const char* name, const at::Tensor& t, int64_t min_dim, const char* layout);

/// \brief A probability in [0, 1).
void check_probability(const char* op, const char* name, double p);

/// \brief "[2, 3, 4]" for messages.
std::string shape_str(at::IntArrayRef shape);

}  // namespace megacore
