#!/usr/bin/env bash
# Rebuilds selfattn's native CPU kernel in place (src/selfattn/kernels/_native/libselfattn_native.so) after an
# edit of src/selfattn/csrc/: the dev path. The compile commands live in scripts/build_native.py, which pip's
# build (setup.py) runs too, so `pip install .` and this script make the same library. Skips an unchanged build;
# --force rebuilds. Environment: CXX (default g++), SELFATTN_NATIVE_OUT (output path, relative to the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "${SELFATTN_VENV:-.venv}/bin/python" ]; then PY=${SELFATTN_VENV:-.venv}/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/build_native.py "$@"
