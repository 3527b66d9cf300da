#!/usr/bin/env bash
# Runs the native kernel's tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the library.
#
#   bash scripts/sanitize.sh [pytest args...]      (default: tests/test_native.py tests/test_native_safety.py)
#
# Builds src/selfattn/csrc with CXX="g++ -fsanitize=address,undefined ..." into build/sanitize/ (the library in
# src/selfattn/kernels/_native/ is left alone), then runs pytest with SELFATTN_NATIVE_LIB pointing at that build
# and the ASan runtime preloaded (python itself is not instrumented, so libasan must come first). Any report
# aborts the run with a non-zero exit: heap/stack overflows, use-after-free (ASan), signed overflow, misaligned
# or out-of-bounds accesses, invalid shifts (UBSan, non-recoverable). Leak checking is off: CPython and torch
# keep their allocations until exit. Takes a few minutes (the build alone ~1 min on 2 cores); OMP_NUM_THREADS=1
# unless set.
# Environment: CXX (default g++), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BASE_CXX=${CXX:-g++}
OUT=build/sanitize/libselfattn_native.so
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "sanitize: building $OUT" >&2
CXX="$BASE_CXX $SAN" SELFATTN_NATIVE_OUT="$OUT" "$PY" scripts/build_native.py  # skipped when unchanged
ASAN_LIB=$($BASE_CXX -print-file-name=libasan.so)
if [ ! -e "$ASAN_LIB" ]; then
  echo "sanitize: $BASE_CXX has no libasan.so ($ASAN_LIB); install the compiler's sanitizer runtime" >&2
  exit 2
fi
# libstdc++ right after libasan: ASan resolves the real __cxa_throw when it starts, and torch's autograd engine throws
# a C++ exception to carry a Python error (a MemoryError from the native backward); without it: "CHECK failed:
# real___cxa_throw != 0" and an abort
STDCXX_LIB=$($BASE_CXX -print-file-name=libstdc++.so.6)
[ -e "$STDCXX_LIB" ] && ASAN_LIB="$ASAN_LIB $STDCXX_LIB"
if [ $# -eq 0 ]; then set -- tests/test_native.py tests/test_native_safety.py; fi
export SELFATTN_NATIVE_LIB="$PWD/$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
echo "sanitize: pytest $* under ASan/UBSan ($SELFATTN_NATIVE_LIB)" >&2
LD_PRELOAD="$ASAN_LIB" "$PY" -m pytest -q -p no:cacheprovider "$@"
