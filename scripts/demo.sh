#!/usr/bin/env bash
# The README's main command: sets up its own environment, then runs the demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV=${SELFATTN_VENV:-.venv}
exec "$VENV/bin/python" -m selfattn.app.demo "$@"
