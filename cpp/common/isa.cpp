#include "common/isa.h"

#include <ATen/Version.h>

namespace megacore::cpu {

Isa active_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    Isa wanted = Isa::kDefault;
    if (cap.rfind("AVX512", 0) == 0) wanted = Isa::kAvx512;
    else if (cap.rfind("AVX2", 0) == 0) wanted = Isa::kAvx2;
#ifndef MEGACORE_CPU_HAVE_AVX512
    if (wanted == Isa::kAvx512) wanted = Isa::kAvx2;
#endif
#ifndef MEGACORE_CPU_HAVE_AVX2
    if (wanted == Isa::kAvx2) wanted = Isa::kDefault;
#endif
    return wanted;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace megacore::cpu
