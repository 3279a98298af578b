// Standalone nvcc translation unit (no torch): compiles every torch-free CUDA kernel of the library
// for the configured archs so CMake can print ptxas' register/spill report (-Xptxas -v) and fail the
// build when a kernel spills (cmake/ptxas_report.cmake).
#include "star_attention/star_plan_kernel.cuh"
#include "star_attention/star_attention_kernel.cuh"
#include "mgvq_lookup/mgvq_lookup_kernel.cuh"
// Instantiate the MGVQ lookup kernels so ptxas reports them (fast paths d = 4, 32; generic d).
template __global__ void htc::mgvq::mgvq_lookup_kernel<4, true>(const float*, const float*,
    const float*, int, int64_t, int, int64_t, int, const float*, int64_t*, float*);
template __global__ void htc::mgvq::mgvq_lookup_kernel<4, false>(const float*, const float*,
    const float*, int, int64_t, int, int64_t, int, const float*, int64_t*, float*);
template __global__ void htc::mgvq::mgvq_lookup_kernel<32, true>(const float*, const float*,
    const float*, int, int64_t, int, int64_t, int, const float*, int64_t*, float*);
template __global__ void htc::mgvq::mgvq_lookup_kernel<0, true>(const float*, const float*,
    const float*, int, int64_t, int, int64_t, int, const float*, int64_t*, float*);

// Every star_attention kernel the extension launches (star_attention_cuda.cu dispatches the same set),
// without and with soft-capping, and the three-CTA builds of the row kernels (three_ctas_built).
namespace htc::star_cuda {
#define HTC_STAR_KERNELS(E, D)                                                  \
  template __global__ void star_row_kernel<FwdCfg<E, D>>(const StarParams);        \
  template __global__ void star_combine_kernel<E, D>(const StarParams);            \
  template __global__ void star_delta_kernel<E, D>(const StarParams);              \
  template __global__ void star_row_kernel<DqCfg<E, D>>(const StarParams);         \
  template __global__ void star_key_kernel<DkvCfg<E, D>>(const StarParams);        \
  template __global__ void star_row_kernel<FwdCfg<E, D, true>>(const StarParams);  \
  template __global__ void star_row_kernel<DqCfg<E, D, true>>(const StarParams);   \
  template __global__ void star_key_kernel<DkvCfg<E, D, true>>(const StarParams);
#define HTC_STAR_ALL_D(E) \
  HTC_STAR_KERNELS(E, 64) HTC_STAR_KERNELS(E, 80) HTC_STAR_KERNELS(E, 96) HTC_STAR_KERNELS(E, 128) HTC_STAR_KERNELS(E, 256)
HTC_STAR_ALL_D(Elt::kF32)
HTC_STAR_ALL_D(Elt::kBF16)
HTC_STAR_ALL_D(Elt::kF16)
#define HTC_STAR_THREE(E, D, CFG)                                                            \
  static_assert(CFG<E, D, false, true>::kThree, "no three-CTA build of this kernel");     \
  template __global__ void star_row_kernel<CFG<E, D, false, true>>(const StarParams); \
  template __global__ void star_row_kernel<CFG<E, D, true, true>>(const StarParams);
#define HTC_STAR_THREE_ALL(E)                                                                   \
  HTC_STAR_THREE(E, 80, FwdCfg) HTC_STAR_THREE(E, 96, FwdCfg) HTC_STAR_THREE(E, 128, FwdCfg) \
  HTC_STAR_THREE(E, 64, DqCfg) HTC_STAR_THREE(E, 80, DqCfg) HTC_STAR_THREE(E, 128, DqCfg)
HTC_STAR_THREE_ALL(Elt::kBF16)
HTC_STAR_THREE_ALL(Elt::kF16)
}  // namespace htc::star_cuda
