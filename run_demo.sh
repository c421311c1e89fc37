#!/usr/bin/env bash
# The main job: sets up .venv (first run only), then starts the cloud and the
# edge on loopback and streams test images through them under emulated 3G, LTE
# and Wi-Fi links. Options go to experiments.demo (--help lists them).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec .venv/bin/python -m experiments.demo "$@"
