// at::vec for this unit's ISA. Include this FIRST in a kernel translation unit (before any ATen
// header), so that at::vec::Vectorized<float> is the AVX-512 (or AVX2) implementation selected by the
// -m flags setup.py compiles this variant with, in an inline namespace named after the variant
// (common/isa.h): no clash with libtorch's symbols, nor between our variants.
#pragma once
#include "common/isa.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif
#define CPU_CAPABILITY HTC_ISA_NS

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
