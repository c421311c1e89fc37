#!/usr/bin/env bash
# The test command: sets up .venv (first run only) and runs the whole suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh tests/test_nets.py -x
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q --doctest-modules popex tests "$@"
