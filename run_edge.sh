#!/usr/bin/env bash
# Start the POPEX edge service with gunicorn.
#
#   POPEX_TOKEN=... ./run_edge.sh --cloud-url URL [--host H] [--port P]
#                                 [--emulate-link RATE_MBPS,RTT_MS] [--emulate-edge-slowdown FACTOR]
#                                 [--state-dir D] [--threads N]
#
# One worker process on purpose: the registered models, their plans and the
# uplink estimate live in its memory (and its background threads), so a
# second process would plan from a different picture. --threads sets the
# request threads of that one process. The rest of the settings come from
# configs/edge.yaml (or the file named by POPEX_EDGE_CONFIG).
set -euo pipefail

cd "$(dirname "$0")"

host=127.0.0.1
port=8000
threads=4
cloud_url=""
emulate_link=""
edge_slowdown=""
edge_device=""
state_dir=""

usage() {
    echo "usage: POPEX_TOKEN=<secret> $0 --cloud-url URL [--host H] [--port P]" \
         "[--emulate-link RATE_MBPS,RTT_MS] [--emulate-edge-slowdown FACTOR | --emulate-edge-device NAME]" \
         "[--state-dir D] [--threads N]" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) [[ $# -ge 2 ]] || usage; host="$2"; shift 2 ;;
        --port) [[ $# -ge 2 ]] || usage; port="$2"; shift 2 ;;
        --cloud-url) [[ $# -ge 2 ]] || usage; cloud_url="$2"; shift 2 ;;
        --emulate-link) [[ $# -ge 2 ]] || usage; emulate_link="$2"; shift 2 ;;
        --emulate-edge-slowdown) [[ $# -ge 2 ]] || usage; edge_slowdown="$2"; shift 2 ;;
        --emulate-edge-device) [[ $# -ge 2 ]] || usage; edge_device="$2"; shift 2 ;;
        --state-dir) [[ $# -ge 2 ]] || usage; state_dir="$2"; shift 2 ;;
        --threads) [[ $# -ge 2 ]] || usage; threads="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done

if [[ -z "${POPEX_TOKEN:-}" ]]; then
    echo "error: POPEX_TOKEN is not set; the edge refuses to start without the token it shares with the cloud." >&2
    echo "       e.g.  export POPEX_TOKEN=\$(python3 -c 'import secrets; print(secrets.token_hex(16))')" >&2
    exit 1
fi
if [[ -z "$cloud_url" && -z "${POPEX_CLOUD_URL:-}" ]]; then
    echo "error: --cloud-url is required (e.g. --cloud-url http://127.0.0.1:8001)" >&2
    usage
fi
# The same rule as the config's (MIN_TOKEN_CHARS), checked here so a bad token is one line, not a traceback.
if (( ${#POPEX_TOKEN} < 8 )) || [[ "$POPEX_TOKEN" =~ [[:space:]] ]]; then
    echo "error: POPEX_TOKEN must be at least 8 characters without spaces (got ${#POPEX_TOKEN}); the edge refuses to start." >&2
    exit 1
fi
[[ "$port" =~ ^[0-9]+$ ]] || { echo "error: --port must be a number, got '$port'" >&2; exit 2; }
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || { echo "error: --threads must be a positive number, got '$threads'" >&2; exit 2; }
if [[ -n "$cloud_url" ]]; then export POPEX_CLOUD_URL="$cloud_url"; fi
if [[ -n "$emulate_link" ]]; then export POPEX_EMULATE_LINK="$emulate_link"; fi
if [[ -n "$edge_device" ]]; then
    # A named device of configs/devices.yaml: its measured factor, never a typed-in one.
    [[ -z "$edge_slowdown" ]] || { echo "error: give --emulate-edge-device or --emulate-edge-slowdown, not both" >&2; exit 2; }
    edge_slowdown="$(PYTHONPATH=. .venv/bin/python -m popex.runtime.devices "$edge_device")" || exit 2
fi
if [[ -n "$edge_slowdown" ]]; then export POPEX_EMULATE_EDGE_SLOWDOWN="$edge_slowdown"; fi
if [[ -n "$state_dir" ]]; then export POPEX_EDGE_STATE_DIR="$state_dir"; fi

if [[ -x .venv/bin/gunicorn ]]; then
    gunicorn=.venv/bin/gunicorn
else
    gunicorn=gunicorn
fi

# Recent gunicorn opens a control socket at one fixed path per user; several
# services on one host would fight over it, and POPEX does not use it.
extra=()
gunicorn_help="$("$gunicorn" --help 2>/dev/null || true)"
if [[ "$gunicorn_help" == *--no-control-socket* ]]; then
    extra+=(--no-control-socket)
fi

# --timeout: a worker busy registering a big model must not be killed as stuck.
# The worker class is gthread that buffers each connection's headers off the
# request threads (api_common/gunicorn_worker.py): slow clients hold no thread.
exec "$gunicorn" "${extra[@]}" \
    --bind "$host:$port" \
    --worker-class api_common.gunicorn_worker.BufferingThreadWorker --workers 1 --threads "$threads" \
    --timeout 120 --keep-alive 30 \
    --access-logfile - \
    'edge_api:create_app()'
