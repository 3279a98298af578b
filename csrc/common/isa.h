// Which CPU kernel variant a translation unit is compiled as (runtime ISA dispatch: cpu_dispatch.h).
// setup.py compiles every `*_isa.cpp` source once per variant, each time with that variant's -m flags
// and -DHTC_ISA=<name>; everything such a unit defines with external linkage is in a namespace named
// after the variant (HTC_ISA_NS), so the copies never meet at link time. Without HTC_ISA (the C++ unit
// tests, compiled with -march=native) the variant is "native".
#pragma once

#ifndef HTC_ISA
#define HTC_ISA native
#endif
#define HTC_ISA_CAT2_(a, b) a##b
#define HTC_ISA_CAT_(a, b) HTC_ISA_CAT2_(a, b)
#define HTC_ISA_NS HTC_ISA_CAT_(isa_, HTC_ISA)
