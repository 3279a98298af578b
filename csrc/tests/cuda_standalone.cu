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
// The three-CTA builds are exactly those three_ctas_built names: elsewhere CFG<E, D, kCap, true> is the
// default type, instantiated explicitly below, so a kThree build is referenced (implicitly
// instantiated) only where it exists.
template <class C>
void reference_three_ctas() {
  if constexpr (C::kThree) {
    static void (*volatile sink)(const StarParams);
    sink = star_row_kernel<C>;
  }
}
template <Elt E, int D>
void reference_three_ctas_all() {
  reference_three_ctas<FwdCfg<E, D, false, true>>(), reference_three_ctas<FwdCfg<E, D, true, true>>();
  reference_three_ctas<DqCfg<E, D, false, true>>(), reference_three_ctas<DqCfg<E, D, true, true>>();
}
#define HTC_STAR_KERNELS(E, D)                                                  \
  template __global__ void star_row_kernel<FwdCfg<E, D>>(const StarParams);        \
  template __global__ void star_combine_kernel<E, D>(const StarParams);            \
  template __global__ void star_delta_kernel<E, D>(const StarParams);              \
  template __global__ void star_row_kernel<DqCfg<E, D>>(const StarParams);         \
  template __global__ void star_key_kernel<DkvCfg<E, D>>(const StarParams);        \
  template __global__ void star_row_kernel<FwdCfg<E, D, true>>(const StarParams);  \
  template __global__ void star_row_kernel<DqCfg<E, D, true>>(const StarParams);   \
  template __global__ void star_key_kernel<DkvCfg<E, D, true>>(const StarParams);  \
  template void reference_three_ctas_all<E, D>();
#define HTC_STAR_ALL_D(E) \
  HTC_STAR_KERNELS(E, 64) HTC_STAR_KERNELS(E, 80) HTC_STAR_KERNELS(E, 96) HTC_STAR_KERNELS(E, 128) HTC_STAR_KERNELS(E, 256)
HTC_STAR_ALL_D(Elt::kF32)
HTC_STAR_ALL_D(Elt::kBF16)
HTC_STAR_ALL_D(Elt::kF16)
}  // namespace htc::star_cuda
