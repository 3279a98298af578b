// Standalone nvcc translation unit (no torch): compiles every torch-free CUDA kernel of the library
// for the configured archs so CMake can print ptxas' register/spill report (-Xptxas -v).
#include "star_attention/star_plan_kernel.cuh"
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
