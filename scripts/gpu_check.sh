#!/usr/bin/env bash
# GPU check (issue 8): one command for a machine with a CUDA GPU and no network. Run from anywhere:
#
#   bash scripts/gpu_check.sh [--quick] [--skip-build] [--skip-tests] [--no-profile] [--smoke] [--sanitize]
#
# Phases (each timed; a failing phase is recorded and the next ones still run; exit 1 at the end if
# any failed, 2 if torch sees no GPU):
#   1 env    nvidia-smi, python/torch/CUDA/triton/xformers/... versions, what is missing (~5 s)
#   2 build  htc_kernels._C in place (`setup.py build_ext --inplace`, no pip, no network) against the
#            torch that is there, nvcc for this device's arch only, MAX_JOBS=nproc (~1-3 min)
#   3 tests  pytest tests/test_star_attention.py tests/test_mgvq_lookup.py on the GPU (~1-2 min); first, in
#            a process of their own, the tests that raise C++ exceptions from CPU ops (they crashed the
#            process on the 2026-11-22 H100: a crash there prints the loaded runtime libraries and a
#            native backtrace, gdb or cuda-gdb)
#   4 bench  python -m benchmarks.gpu_star_attention -> benchmarks/results/gpu-<device>.md/.json (~2-4 min)
#            (without --quick also its Triton tile sweep: triton at 13 other tile configs, ~2-4 min;
#            the budget cuts it short, in SWEEP_TILES order)
#   5 profile  Nsight Compute (ncu, when installed) on the htc kernels of HTC_GPU_PROFILE_UNITS (default:
#            llava-b16 fwd and fwd+bwd on cuda, fwd on triton; 16img fwd on cuda): speed of light,
#            occupancy, launch stats (registers, shared memory), warp stalls, memory workload ->
#            gpu-<device>-ncu.txt (~1 min); then warp-stall sampling per SASS instruction (SourceCounters)
#            of the CUDA forward on HTC_GPU_STALL_UNITS (default llava-b16 and 16img fwd), summarised
#            by benchmarks/ncu_stalls.py -> gpu-<device>-stalls.md (+ -sass.csv.gz, -stalls.ncu-rep;
#            ~1 min). Both are held back from the benchmark's budget
#   6 tests  the rest of tests/, only if the budget has time left (not with --quick)
#   7 copy   results and logs to $OUT when it is set (the device tool returns files from there)
# Whole run: under 8 minutes on an H100. Budget HTC_GPU_CHECK_BUDGET_S (default 400 s): each phase gets
# a time limit from what is left, and the benchmark starts no new measurement once it is spent (the one
# in flight, at worst a ~1 min FlexAttention compile, finishes).
#
# Options:
#   --quick       no phase 5; bench: only the units with targets, fewer repetitions
#   --skip-build  use the extension already built in place (htc_kernels/_C*.so)
#   --skip-tests  no pytest phase
#   --no-profile  no Nsight Compute phase
#   --smoke       no GPU needed: the whole script on this machine, the benchmark in --smoke mode
#   --sanitize    instead of phases 3-6: compute-sanitizer memcheck, racecheck and synccheck on nine CUDA
#                 tests that reach every star kernel and path (-> gpu-<device>-sanitize.log; ~3-6 min;
#                 budget 540 s). After a full run: --skip-build --sanitize
# Environment: PYTHON (default: the first of python3, .venv/bin/python, python that imports torch),
#   TORCH_CUDA_ARCH_LIST (default: this device's capability, e.g. 9.0), MAX_JOBS (default: nproc),
#   CUDA_HOME (default: /usr/local/cuda if it has nvcc, else from the nvcc on PATH), OUT,
#   HTC_GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-n 4" where pytest-xdist is installed).
set -uo pipefail # no -e: phases record their failures and the script goes on
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

QUICK=0 SKIP_BUILD=0 SKIP_TESTS=0 SMOKE=0 NO_PROFILE=0 SANITIZE=0
TESTS_OFF=--skip-tests PROFILE_OFF=--no-profile
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --no-profile) NO_PROFILE=1 ;;
    --sanitize) SANITIZE=1 SKIP_TESTS=1 NO_PROFILE=1 TESTS_OFF=--sanitize PROFILE_OFF=--sanitize ;;
    --smoke) SMOKE=1 ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_check: unknown option $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

BUDGET=${HTC_GPU_CHECK_BUDGET_S:-$([ "$SANITIZE" = 1 ] && echo 540 || echo 400)}
T0=$(date +%s)
FAILED=0
SUMMARY=()

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
banner() { printf '\n==== [gpu_check %4ss] %s\n' "$(elapsed)" "$*"; }
# record PHASE STATUS SECONDS: one summary line; any status other than ok/skipped marks the run failed
record() {
  SUMMARY+=("$(printf '%-10s %5ss  %s' "$1" "$3" "$2")")
  case "$2" in ok* | skipped*) ;; *) FAILED=1 ;; esac
}
# clamp N LO HI
clamp() {
  local n=$1
  ((n < $2)) && n=$2
  ((n > $3)) && n=$3
  echo "$n"
}
status_of() { # exit code -> words (timeout passes on a child's death by signal N as 128 + N)
  case "$1" in
    0) echo ok ;;
    124 | 137) echo "TIMED OUT (limit $2 s)" ;;
    *) if (($1 > 128)); then echo "CRASHED (signal $(($1 - 128)))"; else echo "FAILED (exit $1)"; fi ;;
  esac
}

# ---------------------------------------------------------------------------------------------- python
pick_python() {
  local p
  for p in ${PYTHON:-} python3 .venv/bin/python python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' >/dev/null 2>&1; then
      echo "$p"
      return 0
    fi
  done
  return 1
}
if ! PY=$(pick_python); then
  echo "gpu_check: no python with torch found (tried: ${PYTHON:-} python3 .venv/bin/python python)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # the in-place build, and `-m benchmarks...`
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # Triton runs compiled on the GPU (the CPU interpreter would skip CUDA tests)

# ----------------------------------------------------------------------------------------- 1 env
banner "1/7 environment"
t=$(date +%s)
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi || echo "(nvidia-smi failed: exit $?)"
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv 2>/dev/null || true
else
  echo "nvidia-smi: not on PATH"
fi
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
for tool in nvcc cmake ninja g++ shellcheck; do
  printf '%-10s %s\n' "$tool:" "$(command -v "$tool" || echo 'not found')"
done
"$PY" -m benchmarks.gpu_star_attention --env 2>&1 | grep -v '^\s*$'
HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$HAS_CUDA" != 1 ] && [ "$SMOKE" != 1 ]; then
  echo "gpu_check: torch ($("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')) sees no" \
    "CUDA device. This script is for a GPU machine; on a CPU-only machine use --smoke." >&2
  exit 2
fi
SMOKE_ARG=()
[ "$SMOKE" = 1 ] && SMOKE_ARG=(--smoke)
STEM=$("$PY" -m benchmarks.gpu_star_attention --print-stem ${SMOKE_ARG[@]+"${SMOKE_ARG[@]}"} 2>/dev/null | tail -n1)
STEM=${STEM:-gpu-unknown} # the benchmark module failed to import: its phase will say why
RES=benchmarks/results
mkdir -p "$RES"
LOG_BUILD=$RES/$STEM-build.log LOG_TESTS=$RES/$STEM-tests.log LOG_BENCH=$RES/$STEM-bench.log
LOG_NCU=$RES/$STEM-ncu.txt LOG_STALLS=$RES/$STEM-stalls.md LOG_SAN=$RES/$STEM-sanitize.log
REP_STALLS=$RES/$STEM-stalls CSV_STALLS=$RES/$STEM-sass.csv
echo "results: $RES/$STEM.md, .json; logs: $RES/$STEM-{build,tests,bench}.log"
record env ok $(($(date +%s) - t))

# ----------------------------------------------------------------------------------------- 2 build
banner "2/7 build htc_kernels._C in place"
t=$(date +%s)
if [ "$SKIP_BUILD" = 1 ]; then
  record build "skipped (--skip-build)" 0
else
  if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
      CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null 2>&1; then
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
  fi
  NOTE=""
  if [ "$HAS_CUDA" = 1 ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    export CUDA_HOME
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
      TORCH_CUDA_ARCH_LIST=$("$PY" -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    fi
    export TORCH_CUDA_ARCH_LIST
    unset HTC_NO_CUDA
    NVCC_CUDA=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda)')
    echo "CUDA_HOME=$CUDA_HOME (nvcc $NVCC_CUDA; torch built with CUDA $TORCH_CUDA)" \
      "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    [ "${NVCC_CUDA%%.*}" != "${TORCH_CUDA%%.*}" ] &&
      echo "WARNING: nvcc $NVCC_CUDA and torch's CUDA $TORCH_CUDA differ in major version; the build may fail"
    NOTE="CUDA arch $TORCH_CUDA_ARCH_LIST"
  else
    export HTC_NO_CUDA=1
    NOTE="CPU kernels only: $([ "$HAS_CUDA" = 1 ] && echo 'no nvcc found' || echo 'no GPU')"
    echo "WARNING: $NOTE; the cuda backend will be skipped"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  command -v ninja >/dev/null 2>&1 || "$PY" -c 'import ninja' 2>/dev/null ||
    echo "WARNING: ninja not found: torch builds serially (slow)"
  limit=$(clamp $(($(left) - 180)) 120 300)
  echo "MAX_JOBS=$MAX_JOBS, time limit $limit s, log $LOG_BUILD"
  timeout -k 15 "$limit" "$PY" setup.py build_ext --inplace >"$LOG_BUILD" 2>&1
  rc=$?
  grep -E 'warning|error' "$LOG_BUILD" | grep -v '^\s*$' | head -n 30
  [ "$rc" != 0 ] && tail -n 40 "$LOG_BUILD"
  "$PY" -m htc_kernels.info 2>&1
  st=$(status_of "$rc" "$limit")
  if [ "$rc" = 0 ] && ! "$PY" -c 'import sys; from htc_kernels import _ext; sys.exit(not _ext.available())' 2>/dev/null; then
    st="FAILED (built, but htc_kernels._C does not load)"
  fi
  record build "$st; $NOTE" $(($(date +%s) - t))
fi

# ----------------------------------------------------------------------------------------- 3 sanitize
if [ "$SANITIZE" = 1 ]; then
  # compute-sanitizer's memcheck, racecheck (shared-memory hazards: the kernels' barriers) and synccheck
  # on CUDA tests that reach every kernel and path: forward, delta, dQ, dK/dV at three dtypes and head
  # dims, decode with split-K and the combine, prefill split-K of long tiles, the key panel, non-finite
  # keys (the exact fix-up), two runs bit for bit, the three-CTA builds (HTC_CUDA_THREE_CTAS). Only
  # kernels whose mangled name holds "star" are instrumented (torch's are not).
  banner "3/7 compute-sanitizer"
  SAN=$(command -v compute-sanitizer ||
    find /usr/local/cuda*/bin /opt/nvidia -name compute-sanitizer -type f 2>/dev/null | sort | tail -n1)
  SAN_TESTS=("tests/test_star_attention.py::test_cuda_head_dims[64-dtype0]"
    "tests/test_star_attention.py::test_cuda_head_dims[128-dtype1]"
    "tests/test_star_attention.py::test_cuda_head_dims[256-dtype2]"
    "tests/test_star_attention.py::test_decode_bottom_right[cuda-left-1]"
    "tests/test_star_attention.py::test_decode_bottom_right[cuda-right-65]"
    "tests/test_star_attention.py::test_several_images_and_voco_tokens_both_paddings[cuda]"
    "tests/test_star_attention.py::test_cuda_masked_keys_and_values_are_never_read[dtype1]"
    "tests/test_star_attention.py::test_gpu_backends_are_deterministic[cuda]"
    "tests/test_star_attention.py::test_cuda_prefill_split_of_long_tiles"
    "tests/test_star_attention.py::test_cuda_three_ctas_builds[128-dtype0]")
  : >"$LOG_SAN"
  if [ -z "$SAN" ]; then
    record sanitize "FAILED (compute-sanitizer not found)" 0
  else
    for tool in memcheck racecheck synccheck; do
      t=$(date +%s)
      limit=$(clamp $(($(left) - 20)) 60 240)
      echo "---- $SAN --tool $tool (limit $limit s)" | tee -a "$LOG_SAN"
      timeout -k 15 "$limit" "$SAN" --tool "$tool" --kernel-name kns=star --error-exitcode 9 --print-limit 20 \
        "$PY" -m pytest "${SAN_TESTS[@]}" -q -p no:cacheprovider >"$LOG_SAN.part" 2>&1
      rc=$?
      cat "$LOG_SAN.part" >>"$LOG_SAN"
      found=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY' "$LOG_SAN.part" | tail -n1 | sed 's/^=* *//')
      ran=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$LOG_SAN.part" | tail -n1) # skipped = not run
      tail -n 4 "$LOG_SAN.part"
      case "$rc" in
        0) st="ok: ${found:-no summary line}; pytest: $ran" ;;
        9) st="FAILED: ${found:-errors} (see $LOG_SAN); pytest: $ran" ;;
        *) st="$(status_of "$rc" "$limit"): ${found:-no summary line}; pytest: $ran" ;;
      esac
      record "$tool" "$st" $(($(date +%s) - t))
    done
    rm -f "$LOG_SAN.part"
  fi
fi

# ----------------------------------------------------------------------------------------- 3 tests
banner "3/7 GPU tests"
t=$(date +%s)
BENCH_RESERVE=$([ "$QUICK" = 1 ] && echo 120 || echo 180)
GPU_TESTS=(tests/test_star_attention.py tests/test_mgvq_lookup.py)
read -r -a PYTEST_ARGS <<<"${HTC_GPU_CHECK_PYTEST_ARGS:-}"
: >"$LOG_TESTS"
if [ "$SKIP_TESTS" = 1 ]; then
  record tests "skipped ($TESTS_OFF)" 0
else
  # A C++ exception from a CPU op (TORCH_CHECK) killed the test process on the 2026-11-22 H100 (the
  # extension built there with /opt/gcc's g++ against torch 2.11; not understood). Those tests run first,
  # in a process of their own, so a crash costs only them; a crash gets the runtime libraries the process
  # mapped and a native backtrace (cuda-gdb: that image has no gdb).
  THROW_TESTS=(tests/test_star_attention.py::test_op_level_checks_raise_not_crash
    tests/test_mgvq_lookup.py::test_non_finite_z)
  echo "pytest ${THROW_TESTS[*]} (C++ exceptions, own process)" | tee -a "$LOG_TESTS"
  timeout -k 15 120 "$PY" -X faulthandler -m pytest "${THROW_TESTS[@]}" -q -p no:cacheprovider 2>&1 |
    tee -a "$LOG_TESTS" | tail -n 5
  st=$(status_of "${PIPESTATUS[0]}" 120)
  record exceptions "$st: $(tail -n1 "$LOG_TESTS")" $(($(date +%s) - t))
  if [[ $st == CRASHED* ]]; then
    {
      echo "---- runtime libraries mapped after loading htc_kernels._C:"
      "$PY" -c 'import torch, htc_kernels._C
for line in sorted({l.split()[-1] for l in open("/proc/self/maps") if ".so" in l}):
    if any(k in line for k in ("stdc++", "gcc_s", "gomp", "libc10.", "_C")): print(line)' 2>&1
      "$PY" -c 'import torch; print("torch built with", torch.__config__.show().splitlines()[1].strip(),
                                   "cxx11 abi", torch.compiled_with_cxx11_abi())' 2>&1
      g++ --version 2>&1 | head -n1
      GDB=$(command -v gdb || command -v cuda-gdb || find /usr/local/cuda*/bin -name cuda-gdb 2>/dev/null | head -n1)
      if [ -n "$GDB" ]; then
        echo "---- $GDB backtrace of test_op_level_checks_raise_not_crash"
        timeout -k 5 120 "$GDB" -batch -ex 'set pagination off' -ex run -ex 'bt 16' \
          --args "$PY" -m pytest "${THROW_TESTS[0]}" -q -p no:cacheprovider 2>&1 | grep -v '^\[New Thread\|^\[Thread' |
          tail -n 40
      else
        echo "---- no gdb / cuda-gdb for a native backtrace"
      fi
    } 2>&1 | tee -a "$LOG_TESTS"
  fi
  t=$(date +%s)
  limit=$(clamp $(($(left) - BENCH_RESERVE)) 60 240)
  echo "pytest ${GPU_TESTS[*]} (limit $limit s)" | tee -a "$LOG_TESTS"
  timeout -k 15 "$limit" "$PY" -m pytest "${GPU_TESTS[@]}" -q -p no:cacheprovider ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} \
    "${THROW_TESTS[@]/#/--deselect=}" 2>&1 | tee -a "$LOG_TESTS" | tail -n 25
  rc=${PIPESTATUS[0]}
  record tests "$(status_of "$rc" "$limit"): $(tail -n1 "$LOG_TESTS")" $(($(date +%s) - t))
fi

# ----------------------------------------------------------------------------------------- 4 bench
banner "4/7 benchmark"
t=$(date +%s)
unset HTC_POISON_OUTPUTS # tests poison kernel outputs with NaN (an extra pass): never while timing
NCU=$(command -v ncu || find /opt/nvidia /usr/local/cuda*/ -name ncu -type f 2>/dev/null | sort | tail -n1)
if [ "$SANITIZE" = 1 ]; then
  record bench "skipped (--sanitize)" 0
else
  PROFILE_RESERVE=0
  [ -n "$NCU" ] && [ "$NO_PROFILE" != 1 ] && [ "$SMOKE" != 1 ] && PROFILE_RESERVE=150
  budget=$(($(left) - 20 - PROFILE_RESERVE))
  ((budget < 90)) && budget=90
  BENCH_ARGS=(--out "$RES" --budget-s "$budget" ${SMOKE_ARG[@]+"${SMOKE_ARG[@]}"})
  [ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
  echo "python -m benchmarks.gpu_star_attention ${BENCH_ARGS[*]}"
  timeout -k 15 $((budget + 120)) "$PY" -m benchmarks.gpu_star_attention "${BENCH_ARGS[@]}" 2>&1 | tee "$LOG_BENCH"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) st=ok ;;
    3) st="FAILED: a provider was WRONG or raised (see the tables)" ;;
    *) st=$(status_of "$rc" $((budget + 120))) ;;
  esac
  record bench "$st" $(($(date +%s) - t))
fi

# ----------------------------------------------------------------------------------------- 5 profile
banner "5/7 profile (Nsight Compute)"
t=$(date +%s)
UNITS=${HTC_GPU_PROFILE_UNITS:-llava-b16:fwd:cuda,llava-b16:fwdbwd:cuda,llava-b16:fwd:triton,16img:fwd:cuda}
: >"$LOG_NCU"
if [ "$NO_PROFILE" = 1 ]; then
  record profile "skipped ($PROFILE_OFF)" 0
elif [ "$SMOKE" = 1 ]; then
  # No GPU, no ncu: the profile runs themselves (checked against the reference), on the CPU.
  "$PY" -m benchmarks.gpu_star_attention --smoke --profile llava-b16:fwd:reference,16img:fwdbwd:reference \
    2>&1 | tee "$LOG_NCU"
  rc=${PIPESTATUS[0]}
  record profile "$(status_of "$rc" 0) (smoke: the runs without ncu)" $(($(date +%s) - t))
elif [ -z "$NCU" ]; then
  record profile "skipped (ncu not found)" 0
elif (($(left) < 45)); then
  record profile "skipped (budget: $(left) s left)" 0
else
  limit=$(clamp $(($(left) - 90)) 45 240) # the rest: the stall sampling below
  # --clock-control none: leave the clocks as the benchmark saw them; only kernels named *star* (the
  # plan, forward, backward, combine and delta kernels of both backends), only inside the profiled runs.
  NCU_ARGS=(--clock-control none --profile-from-start off --kernel-name regex:star
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis)
  echo "$NCU ${NCU_ARGS[*]} $PY -m benchmarks.gpu_star_attention --profile $UNITS (limit $limit s)" | tee "$LOG_NCU"
  timeout -k 15 "$limit" "$NCU" "${NCU_ARGS[@]}" "$PY" -m benchmarks.gpu_star_attention --profile "$UNITS" \
    >>"$LOG_NCU" 2>&1
  rc=$?
  grep -E '^\[profile\]|==ERROR==|==WARNING==' "$LOG_NCU" | head -n 20
  echo "$(grep -c 'Section: Occupancy' "$LOG_NCU") kernel launches profiled; details: $LOG_NCU"
  record profile "$(status_of "$rc" "$limit")" $(($(date +%s) - t))
  # Where the forward's warps wait, by SASS instruction: warp-stall sampling (SourceCounters) of the
  # CUDA forward, exported as ncu's source page and summarised by benchmarks/ncu_stalls.py.
  t=$(date +%s)
  if (($(left) < 40)); then
    record stalls "skipped (budget: $(left) s left)" 0
  else
    limit=$(clamp $(($(left) - 20)) 30 150)
    SUNITS=${HTC_GPU_STALL_UNITS:-llava-b16:fwd:cuda,16img:fwd:cuda}
    echo "stalls: $NCU --section SourceCounters (star_row_kernel) --profile $SUNITS (limit $limit s)" | tee -a "$LOG_NCU"
    rm -f "$REP_STALLS.ncu-rep" "$CSV_STALLS" "$CSV_STALLS.gz"
    timeout -k 15 "$limit" "$NCU" --clock-control none --profile-from-start off --kernel-name regex:star_row_kernel \
      --section SourceCounters -f -o "$REP_STALLS" "$PY" -m benchmarks.gpu_star_attention --profile "$SUNITS" \
      >>"$LOG_NCU" 2>&1
    rc=$?
    if [ -f "$REP_STALLS.ncu-rep" ] &&
      "$NCU" --import "$REP_STALLS.ncu-rep" --page source --csv --print-source sass >"$CSV_STALLS" 2>>"$LOG_NCU" &&
      "$PY" -m benchmarks.ncu_stalls "$CSV_STALLS" >"$LOG_STALLS" 2>>"$LOG_NCU"; then
      head -n 40 "$LOG_STALLS"
      gzip -f "$CSV_STALLS"
      record stalls "$(status_of "$rc" "$limit"): $LOG_STALLS" $(($(date +%s) - t))
    else
      record stalls "FAILED (ncu exit $rc, no source page; see $LOG_NCU)" $(($(date +%s) - t))
    fi
  fi
fi

# ----------------------------------------------------------------------------------------- 6 tests-all
banner "6/7 the rest of tests/"
t=$(date +%s)
limit=$(($(left) - 10))
if [ "$SKIP_TESTS" = 1 ]; then
  record tests-all "skipped ($TESTS_OFF)" 0
elif [ "$QUICK" = 1 ]; then
  record tests-all "skipped (--quick)" 0
elif ((limit < 45)); then
  record tests-all "skipped (budget: $((limit + 10)) s left)" 0
else
  limit=$(clamp "$limit" 45 180)
  echo "pytest tests/ without those two (limit $limit s)" | tee -a "$LOG_TESTS"
  timeout -k 15 "$limit" "$PY" -m pytest tests/ -q -p no:cacheprovider ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} \
    "${GPU_TESTS[@]/#/--ignore=}" 2>&1 | tee -a "$LOG_TESTS" | tail -n 15
  rc=${PIPESTATUS[0]}
  record tests-all "$(status_of "$rc" "$limit"): $(tail -n1 "$LOG_TESTS")" $(($(date +%s) - t))
fi

# ----------------------------------------------------------------------------------------- 6 copy
banner "7/7 results"
MD=$RES/$STEM.md
if [ -f "$MD" ]; then
  {
    echo
    echo "## scripts/gpu_check.sh"
    echo
    echo "Options: ${*:-none}; $(elapsed) s in all. Logs: \`$STEM-{build,tests,bench}.log\`, \`$STEM-ncu.txt\`, \`$STEM-stalls.md\`."
    echo
    echo '```'
    printf '%s\n' "${SUMMARY[@]}"
    echo '```'
  } >>"$MD"
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in "$MD" "$RES/$STEM.json" "$LOG_BUILD" "$LOG_TESTS" "$LOG_BENCH" "$LOG_NCU" "$LOG_STALLS" \
    "$CSV_STALLS.gz" "$REP_STALLS.ncu-rep" "$LOG_SAN"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  echo "copied results and logs to $OUT"
fi

echo
echo "==== gpu_check summary ($(elapsed) s, budget $BUDGET s; python $PY)"
printf '%s\n' "${SUMMARY[@]}"
echo "results: $MD and $RES/$STEM.json"
if [ -f "$MD" ]; then
  echo "targets:"
  grep -E '^- \*\*(PASS|FAIL|N/A)\*\*' "$MD" | cut -c1-240
fi
exit "$FAILED"
