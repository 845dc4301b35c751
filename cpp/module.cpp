// The pybind11 module megacore._C: what is not a tensor op. Importing it also runs the op
// registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) compiled into this library.
#include <pybind11/pybind11.h>

#include "common/isa.h"

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
}
