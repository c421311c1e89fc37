#!/usr/bin/env bash
# The test command: sets up .venv (first run only) and runs the whole suite.
# Arguments go to pytest in place of the default paths (pyproject.toml's testpaths):
#   ./run_tests.sh                      everything, doctests included (~6 min)
#   ./run_tests.sh -m "not slow"        the fast lane for the edit-test loop
#   ./run_tests.sh tests/test_cli.py -x only that file
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
