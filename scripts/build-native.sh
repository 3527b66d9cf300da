#!/usr/bin/env bash
# Builds selfattn's native CPU kernel: src/selfattn/csrc/*.cc -> src/selfattn/kernels/_native/libselfattn_native.so
# Plain C++17 with a C ABI (no torch headers: those take ~60 s per file), loaded by kernels/native.py through
# ctypes. forward.cc and backward.cc are compiled once per instruction set (portable, AVX2+FMA, AVX-512) into
# separate namespaces; dispatch.cc picks one on the running CPU. Takes a few seconds; safe to rerun.
# Environment: CXX (default g++), SELFATTN_NATIVE_OUT (output path).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=src/selfattn/csrc
OUT=${SELFATTN_NATIVE_OUT:-src/selfattn/kernels/_native/libselfattn_native.so}
CXX=${CXX:-g++}
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "build-native: no C++ compiler ($CXX) found; selfattn runs without its native kernel" >&2
  exit 1
fi
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# -O3, FMA contraction; no -ffast-math (it would break the inf/NaN handling of masked scores)
COMMON=(-std=c++17 -O3 -fPIC -fno-math-errno -fno-trapping-math -ffp-contract=fast -fvisibility=hidden
        -fno-semantic-interposition -Wall -Wno-psabi -Wno-unused-function)
declare -A FLAGS=(
  [scalar]="-DSA_VBYTES=16"
  [avx2]="-DSA_VBYTES=32 -mavx2 -mfma -mf16c"
  [avx512]="-DSA_VBYTES=64 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c"
)
pids=()
# bf16 forward with AVX512_BF16 dot products (vdpbf16ps): a fourth build of forward.cc, used only where the CPU has it
"$CXX" "${COMMON[@]}" ${FLAGS[avx512]} -mavx512bf16 -DSA_DPBF16=1 -DSA_NS=sa_avx512bf16 -c "$SRC/forward.cc" \
  -o "$TMP/forward_avx512bf16.o" &
pids+=($!)
for isa in scalar avx2 avx512; do
  for f in forward backward; do
    # shellcheck disable=SC2086
    "$CXX" "${COMMON[@]}" ${FLAGS[$isa]} -DSA_NS=sa_$isa -c "$SRC/$f.cc" -o "$TMP/${f}_$isa.o" &
    pids+=($!)
  done
done
"$CXX" "${COMMON[@]}" -c "$SRC/dispatch.cc" -o "$TMP/dispatch.o" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
"$CXX" -shared -pthread -o "$TMP/lib.so" "$TMP"/*.o -lm
mv -f "$TMP/lib.so" "$OUT"  # atomic replace: a process that has the old library mapped keeps it
echo "build-native: $OUT"
