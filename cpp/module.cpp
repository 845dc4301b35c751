// The pybind11 module megacore._C: what is not a tensor op. Importing it also runs the op
// registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) compiled into this library.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::pair -> tuple

#include <c10/util/Exception.h>

#include "common/isa.h"
#include "data/helpers.h"
#include "kernels/linear.h"
#include "parallel/shard.h"
#include "parallel/wait.h"
#include "transformer/config.h"

namespace py = pybind11;

namespace {

py::list split_csv(const std::string& s) {
  py::list out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.append(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

/// \brief Calls f, turning megacore's c10::ValueError into Python's ValueError (message without C++ backtrace).
template <typename R, typename... A>
auto value_errors(R (*f)(A...)) {
  return [f](A... args) -> R {
    try {
      return f(args...);
    } catch (const c10::ValueError& e) {
      throw py::value_error(e.what_without_backtrace());
    }
  };
}

/// \brief Runs f(), turning c10::ValueError into Python's ValueError (for lambdas; see value_errors).
template <typename F>
auto rethrow_value_errors(F&& f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  }
}

/// \brief A 1-D integer numpy array (any int width) as a C-contiguous int64 array. Floats and other kinds
///        are a TypeError rather than being silently truncated by forcecast.
py::array_t<int64_t> int64_vector(const char* fn, const char* name, const py::handle& obj) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::type_error(std::string("megacore.data.") + fn + ": " + name + " must be a numpy array");
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::type_error(std::string("megacore.data.") + fn + ": " + name + " must have an integer dtype, got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != 1) {
    throw py::value_error(std::string("megacore.data.") + fn + ": " + name + " must be 1-D, got " +
                          std::to_string(a.ndim()) + " dimensions");
  }
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

/// \brief A torch dtype's short name ("float32", "bfloat16", "float16", "float64") as a ScalarType.
c10::ScalarType scalar_type_of(const std::string& name) {
  if (name == "float32") return c10::kFloat;
  if (name == "float64") return c10::kDouble;
  if (name == "float16") return c10::kHalf;
  if (name == "bfloat16") return c10::kBFloat16;
  throw py::value_error("megacore._C: dtype '" + name + "' is not one of float32, float64, float16, bfloat16");
}

/// \brief A ScalarType's torch name ("float32", "int64", ...), as torch.<name>.
std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kLong: return "int64";
    default: throw py::value_error(std::string("megacore._C: no torch name for dtype ") + c10::toString(t));
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megacore's compiled core";
  m.def(
      "build_info",
      [] {
        py::dict d;
        d["cpu_isas"] = split_csv(MEGACORE_BUILD_CPU_ISAS);
        d["cpu_isa_active"] = megacore::cpu::isa_name(megacore::cpu::active_isa());
#ifdef MEGACORE_WITH_CUDA
        d["cuda"] = true;
#else
        d["cuda"] = false;
#endif
        d["cuda_archs"] = split_csv(MEGACORE_BUILD_CUDA_ARCHS);
        d["torch_version"] = MEGACORE_BUILD_TORCH_VERSION;
        d["compiler"] = MEGACORE_BUILD_COMPILER;
        d["cxx_standard"] = MEGACORE_BUILD_CXX_STANDARD;
        d["build_type"] = MEGACORE_BUILD_TYPE;
        d["openmp"] = MEGACORE_BUILD_OPENMP;
        return d;
      },
      "What this build of megacore contains: CPU ISAs, CUDA and its archs, the torch it was built against, "
      "the compiler.");

  // Shard arithmetic (cpp/parallel/shard.h): python/megacore/parallel uses these.
  namespace sh = megacore::shard;
  m.def("divide", value_errors(&sh::divide), py::arg("n"), py::arg("parts"),
        "n // parts; ValueError when parts does not divide n.");
  m.def("pad_to_multiple", value_errors(&sh::pad_to_multiple), py::arg("n"), py::arg("k"),
        "The smallest multiple of k that is >= n.");
  m.def(
      "collective_wait",
      [](const std::string& device) {
        c10::DeviceType type;
        try {
          type = c10::Device(device).type();
        } catch (const c10::Error&) {
          throw py::value_error("megacore._C.collective_wait: device '" + device + "' is not a device name (cpu, cuda)");
        }
        return std::string(megacore::collective_wait_name(megacore::collective_wait(type)));
      },
      py::arg("device"),
      "How megacore's collectives and the DDP reducer wait on tensors of `device` (\"cpu\", \"cuda\"): \"bounded\" (the "
      "host blocks, at most the group's timeout) or \"stream-ordered\" (the current stream waits; the host runs ahead).");
  m.def("shard_range", value_errors(&sh::shard_range), py::arg("size"), py::arg("rank"), py::arg("world_size"),
        "(start, end) of rank's piece of an even split of size; ValueError when world_size does not divide size.");
  m.def("vocab_range", value_errors(&sh::vocab_range), py::arg("padded_vocab"), py::arg("rank"),
        py::arg("world_size"), "(start, end) of the vocab ids rank owns in a padded vocab (divisible by world_size).");

  // The transformer layer's one definition (cpp/transformer/config.h): python/megacore/transformer/spec.py reads it.
  namespace tf = megacore::transformer;
  m.def(
      "transformer_layer_spec",
      [] {
        py::dict d;
        py::list params, slots, fields;
        for (const auto& p : tf::param_table()) params.append(py::make_tuple(p.arg, p.name, p.required));
        for (const char* s : tf::slot_names()) slots.append(s);
        for (const auto& [name, def] : tf::config_fields()) {
          fields.append(py::make_tuple(name, def.has_value() ? py::object(py::str(*def)) : py::object(py::none())));
        }
        py::list grads;  // transformer_layer_backward's outputs, in order
        grads.append("hidden");
        for (const auto& p : tf::param_table()) grads.append(p.name);
        grads.append("attention_bias");
        grads.append("memory");
        d["grads"] = grads;
        d["params"] = params;
        d["saved"] = slots;
        d["config_fields"] = fields;
        py::dict sites;
        sites["attention"] = static_cast<int64_t>(tf::DropoutSite::kAttention);
        sites["after_attention"] = static_cast<int64_t>(tf::DropoutSite::kAfterAttention);
        sites["after_mlp"] = static_cast<int64_t>(tf::DropoutSite::kAfterMlp);
        sites["cross_attention"] = static_cast<int64_t>(tf::DropoutSite::kCrossAttention);
        sites["after_cross_attention"] = static_cast<int64_t>(tf::DropoutSite::kAfterCrossAttention);
        d["dropout_sites"] = sites;
        return d;
      },
      "The transformer layer ops' definition: params [(schema argument, module parameter name, required)] in schema "
      "order, saved [slot names] in order, grads [what each output of transformer_layer_backward is the gradient "
      "of], config_fields [(name, default or None if required)], dropout_sites.");
  m.def(
      "transformer_layer_config",
      [](const std::vector<std::pair<std::string, std::string>>& fields) {
        return rethrow_value_errors([&] { return tf::canonical_config(fields); });
      },
      py::arg("fields"),
      "The canonical `config` string of the transformer layer ops from (field, value-as-string) pairs; ValueError "
      "naming the field for an unknown field or a bad value.");
  m.def(
      "transformer_layer_uses_flash",
      [](const std::string& config, const std::string& device, const std::string& dtype, int64_t head_dim) {
        return rethrow_value_errors([&] {
          return tf::uses_flash(*tf::config_of(config), c10::Device(device).type(), scalar_type_of(dtype), head_dim);
        });
      },
      py::arg("config"), py::arg("device"), py::arg("dtype"), py::arg("head_dim"),
      "Whether the layer runs PyTorch's flash kernel for this config on device (\"cpu\", \"cuda\") and dtype "
      "(\"float32\", \"bfloat16\", ...).");
  m.def(
      "transformer_layer_saved_shapes",
      [](const std::string& config, const std::string& device, const std::string& dtype, int64_t s_local, int64_t b,
         int64_t h, int64_t f, int64_t tp_size, int64_t memory_local) {
        return rethrow_value_errors([&] {
          const auto c = tf::config_of(config);
          const tf::TensorParallel tp{tp_size, 0};
          const auto t = scalar_type_of(dtype);
          const auto type = c10::Device(device).type();
          py::list out;
          for (const auto& slot : tf::saved_shapes(*c, tp, type, t, tf::dims_of(*c, tp, s_local, b, h, f, memory_local))) {
            out.append(py::make_tuple(slot.from_flash ? py::object(py::none()) : py::object(py::cast(slot.shape)),
                                      dtype_name(slot.dtype)));
          }
          return out;
        });
      },
      py::arg("config"), py::arg("device"), py::arg("dtype"), py::arg("s_local"), py::arg("batch"), py::arg("hidden"),
      py::arg("fc1_rows"), py::arg("tensor_parallel_size"), py::arg("memory_local") = 0,
      "[(shape, dtype name)] of each saved slot of megacore::transformer_layer (shape None: the CUDA flash kernel's "
      "own tensor).");
  m.def("transformer_layer_dropout_seed",
        [](int64_t seed, int64_t site, int64_t rank) {
          return tf::site_seed(seed, static_cast<tf::DropoutSite>(site), rank);
        },
        py::arg("seed"), py::arg("site"), py::arg("rank"),
        "The Philox seed of one dropout site of the layer (config.h's site_seed).");

  m.attr("SKINNY_LINEAR_MAX_ROWS") = megacore::kernels::kSkinnyLinearMaxRows;  // megacore.ops.linear's CPU kernel

  // Dataset index builders (cpp/data/helpers.h); python/megacore/data/index_reference.py has the same
  // functions in pure Python, with the same signatures.
  namespace dh = megacore::data;
  m.def(
      "build_sample_index",
      [](const py::object& sizes_obj, const py::object& document_index_obj, int64_t seq_length, int64_t num_epochs,
         int64_t tokens_per_epoch, bool drop_last_partial_sequence, int64_t add_extra_token_to_sequence) {
        return rethrow_value_errors([&] {
          const auto sizes = int64_vector("build_sample_index", "sizes", sizes_obj);
          const auto document_index = int64_vector("build_sample_index", "document_index", document_index_obj);
          TORCH_CHECK_VALUE(num_epochs >= 1, "megacore.data.build_sample_index: num_epochs must be >= 1, got ",
                            num_epochs);
          const int64_t total = dh::document_index_tokens(sizes.data(), sizes.shape(0), document_index.data(),
                                                          document_index.shape(0));
          // The walk trusts the token count; one that disagrees with the index would read past its end.
          TORCH_CHECK_VALUE(tokens_per_epoch >= 0 && total % num_epochs == 0 && total / num_epochs == tokens_per_epoch,
                            "megacore.data.build_sample_index: num_epochs (", num_epochs, ") * tokens_per_epoch (",
                            tokens_per_epoch, ") must equal the tokens of the document index (", total, ")");
          const int64_t num_samples =
              dh::num_samples_for(total, seq_length, drop_last_partial_sequence, add_extra_token_to_sequence);
          py::array_t<int64_t> sample_index({num_samples + 1, int64_t{2}});
          int64_t* out = sample_index.mutable_data();
          {
            py::gil_scoped_release release;
            dh::build_sample_index(sizes.data(), document_index.data(), document_index.shape(0), seq_length,
                                   add_extra_token_to_sequence, num_samples, out);
          }
          return sample_index;
        });
      },
      py::arg("sizes"), py::arg("document_index"), py::arg("seq_length"), py::arg("num_epochs"),
      py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence") = true,
      py::arg("add_extra_token_to_sequence") = 1,
      "GPT sample index, int64 [num_samples + 1, 2]: (position in document_index, token offset) where each sample "
      "starts; sizes[d] is document d's length. Megatron's build_sample_idx semantics.");
  m.def(
      "build_blending_indices",
      [](const py::array_t<double, py::array::c_style | py::array::forcecast>& weights, int64_t size) {
        return rethrow_value_errors([&] {
          TORCH_CHECK_VALUE(weights.ndim() == 1, "megacore.data.build_blending_indices: weights must be 1-D, got ",
                            weights.ndim(), " dimensions");
          dh::check_blending_weights(weights.data(), weights.shape(0), size);
          py::array_t<int16_t> dataset_index(size);
          py::array_t<int64_t> dataset_sample_index(size);
          int16_t* di = dataset_index.mutable_data();
          int64_t* dsi = dataset_sample_index.mutable_data();
          {
            py::gil_scoped_release release;
            dh::build_blending_indices(weights.data(), weights.shape(0), size, di, dsi);
          }
          return py::make_tuple(dataset_index, dataset_sample_index);
        });
      },
      py::arg("weights"), py::arg("size"),
      "(dataset_index int16 [size], dataset_sample_index int64 [size]): Megatron's greedy blending, each prefix "
      "following the normalised weights (each count within 1.5 samples of its share at every prefix, within 1 at the end).");
  m.def(
      "build_exhaustive_blending_indices",
      [](const py::object& sizes_obj) {
        return rethrow_value_errors([&] {
          const auto sizes = int64_vector("build_exhaustive_blending_indices", "sizes", sizes_obj);
          const int64_t total = dh::check_blending_sizes(sizes.data(), sizes.shape(0));
          py::array_t<int16_t> dataset_index(total);
          py::array_t<int64_t> dataset_sample_index(total);
          int16_t* di = dataset_index.mutable_data();
          int64_t* dsi = dataset_sample_index.mutable_data();
          {
            py::gil_scoped_release release;
            dh::build_exhaustive_blending_indices(sizes.data(), sizes.shape(0), di, dsi);
          }
          return py::make_tuple(dataset_index, dataset_sample_index);
        });
      },
      py::arg("sizes"),
      "(dataset_index int16 [sum(sizes)], dataset_sample_index int64 [sum(sizes)]): every dataset i exactly "
      "sizes[i] times, interleaved in proportion.");
}
