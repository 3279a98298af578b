# Compiles the standalone CUDA translation unit with ptxas' resource report, prints a table (kernel,
# arch, registers, stack frame, spill stores/loads) and fails when any kernel spills.
#   cmake -DNVCC=... -DSRC=... -DINCLUDE=... -DARCHS="80;90" -DOUT=... -P ptxas_report.cmake
set(gencode "")
foreach(arch ${ARCHS})
  list(APPEND gencode "-gencode=arch=compute_${arch},code=sm_${arch}")
endforeach()
execute_process(
  # The flags of setup.py's CUDA build (C++20 as torch requires, -O3, -lineinfo), which change
  # register allocation: the report must describe the kernels the extension ships.
  COMMAND ${NVCC} -std=c++20 -O3 --expt-relaxed-constexpr -lineinfo -I${INCLUDE} ${gencode}
          -Xptxas=-v -c ${SRC} -o ${OUT}.o
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(WRITE ${OUT}.log "${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed:\n${out}${err}")
endif()
string(REPLACE "\n" ";" lines "${err}")
set(kernel "")
set(arch "")
set(table "")
set(spilled "")
foreach(line IN LISTS lines)
  if(line MATCHES "Compiling entry function '([^']+)' for '(sm_[0-9a-z]+)'")
    set(kernel "${CMAKE_MATCH_1}")
    set(arch "${CMAKE_MATCH_2}")
  elseif(line MATCHES "([0-9]+) bytes stack frame, ([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads")
    set(stack "${CMAKE_MATCH_1}")
    set(stores "${CMAKE_MATCH_2}")
    set(loads "${CMAKE_MATCH_3}")
  elseif(line MATCHES "Used ([0-9]+) registers" AND NOT kernel STREQUAL "")
    string(APPEND table "  ${arch} regs=${CMAKE_MATCH_1} stack=${stack} spill_st=${stores} spill_ld=${loads}  ${kernel}\n")
    if(NOT stores EQUAL 0 OR NOT loads EQUAL 0)
      string(APPEND spilled "  ${arch} ${kernel}: ${stores} B stores, ${loads} B loads\n")
    endif()
    set(kernel "")
  endif()
endforeach()
message(STATUS "ptxas resource report (full log: ${OUT}.log):\n${table}")
if(NOT spilled STREQUAL "")
  message(FATAL_ERROR "register spills (kernels must not spill):\n${spilled}")
endif()
file(WRITE ${OUT} "${table}")  # only on success: a failed check is re-run by the next build
