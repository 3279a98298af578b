// Standalone nvcc translation unit (no torch): compiles every torch-free CUDA kernel of the library
// for the configured archs so CMake can print ptxas' register/spill report (-Xptxas -v).
#include "star_attention/star_plan_kernel.cuh"
