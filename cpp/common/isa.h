#pragma once
// \brief Run-time choice among the per-ISA builds of the CPU kernels.
//
// Files in cpp/cpu/kernels/ are compiled once per ISA (CMakeLists.txt) with CPU_CAPABILITY set to
// DEFAULT, AVX2 or AVX512, and define their entry points in namespace megacore::cpu::CPU_CAPABILITY.
// The glue declares a kernel once with MEGACORE_CPU_KERNEL and calls `name##_kernel()(args...)`,
// which returns the build matching at::get_cpu_capability() (so ATEN_CPU_CAPABILITY=default|avx2|avx512
// forces a level, as it does for ATen).

namespace megacore::cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

/// \brief The ISA whose kernels run in this process: torch's CPU capability, capped at what was built.
Isa active_isa();

/// \brief "DEFAULT", "AVX2" or "AVX512".
const char* isa_name(Isa isa);

template <typename Fn>
Fn* select_kernel(Fn* default_fn, Fn* avx2_fn, Fn* avx512_fn) {
  switch (active_isa()) {
    case Isa::kAvx512:
      if (avx512_fn) return avx512_fn;
      [[fallthrough]];
    case Isa::kAvx2:
      if (avx2_fn) return avx2_fn;
      [[fallthrough]];
    default:
      return default_fn;
  }
}

}  // namespace megacore::cpu

#ifdef MEGACORE_CPU_HAVE_AVX2
#define MEGACORE_CPU_AVX2_FN(name) &::megacore::cpu::AVX2::name
#else
#define MEGACORE_CPU_AVX2_FN(name) nullptr
#endif
#ifdef MEGACORE_CPU_HAVE_AVX512
#define MEGACORE_CPU_AVX512_FN(name) &::megacore::cpu::AVX512::name
#else
#define MEGACORE_CPU_AVX512_FN(name) nullptr
#endif

/// MEGACORE_CPU_KERNEL(name, function type) declares kernel `name` in every ISA namespace, and
/// `name##_kernel()` returning the one to call. Use at global scope.
#define MEGACORE_CPU_KERNEL(name, ...) MEGACORE_CPU_KERNEL_IMPL(name, __VA_ARGS__)
#define MEGACORE_CPU_KERNEL_IMPL(name, ...)                                                         \
  namespace megacore::cpu {                                                                         \
  using name##_fn = __VA_ARGS__;                                                                    \
  }                                                                                                 \
  MEGACORE_CPU_KERNEL_DECLARE(name, name##_fn)
#define MEGACORE_CPU_KERNEL_DECLARE(name, fn_type)                                                  \
  namespace megacore::cpu {                                                                         \
  namespace DEFAULT { fn_type name; }                                                               \
  namespace AVX2 { fn_type name; }                                                                  \
  namespace AVX512 { fn_type name; }                                                                \
  inline fn_type* name##_kernel() {                                                                 \
    static fn_type* fn = select_kernel<fn_type>(&DEFAULT::name, MEGACORE_CPU_AVX2_FN(name),         \
                                                MEGACORE_CPU_AVX512_FN(name));                      \
    return fn;                                                                                      \
  }                                                                                                 \
  }
