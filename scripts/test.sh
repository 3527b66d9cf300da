#!/usr/bin/env bash
# The README's test command: sets up its own environment, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/install-browser.sh || echo "warning: could not install chromium; browser tests will fail"
VENV=${SELFATTN_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
