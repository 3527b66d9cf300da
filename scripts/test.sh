#!/usr/bin/env bash
# The README's test command: sets up its own environment, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bash scripts/install-browser.sh || echo "warning: could not install chromium; browser tests will fail"
VENV=${SELFATTN_VENV:-.venv}
# The suite is thousands of small tensor ops: one intra-op thread per process is ~3x faster on 2 cores than two
# threads spinning against each other (measured on the core tests: 13 s vs 44 s CPU). Timings live in benchmarks/.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/python" -m pytest -q "$@"
