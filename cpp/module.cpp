// The pybind11 module megacore._C: what is not a tensor op. Importing it also runs the op
// registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) compiled into this library.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::pair -> tuple

#include <c10/util/Exception.h>

#include "common/isa.h"
#include "parallel/shard.h"

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
  m.def("shard_range", value_errors(&sh::shard_range), py::arg("size"), py::arg("rank"), py::arg("world_size"),
        "(start, end) of rank's piece of an even split of size; ValueError when world_size does not divide size.");
  m.def("vocab_range", value_errors(&sh::vocab_range), py::arg("padded_vocab"), py::arg("rank"),
        py::arg("world_size"), "(start, end) of the vocab ids rank owns in a padded vocab (divisible by world_size).");
}
