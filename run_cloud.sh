#!/usr/bin/env bash
# Start the POPEX cloud service with gunicorn.
#
#   POPEX_TOKEN=... ./run_cloud.sh [--host H] [--port P] [--state-dir D] [--threads N]
#
# --threads sets gunicorn's request threads (one worker process: registered
# models are held in its memory; more workers on the same state dir also
# work, each loading models from disk on first use).
set -euo pipefail

cd "$(dirname "$0")"

host=127.0.0.1
port=8001
threads=4
state_dir=""

usage() {
    echo "usage: POPEX_TOKEN=<secret> $0 [--host H] [--port P] [--state-dir D] [--threads N]" >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) [[ $# -ge 2 ]] || usage; host="$2"; shift 2 ;;
        --port) [[ $# -ge 2 ]] || usage; port="$2"; shift 2 ;;
        --state-dir) [[ $# -ge 2 ]] || usage; state_dir="$2"; shift 2 ;;
        --threads) [[ $# -ge 2 ]] || usage; threads="$2"; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done

if [[ -z "${POPEX_TOKEN:-}" ]]; then
    echo "error: POPEX_TOKEN is not set; the cloud refuses to start without a shared token." >&2
    echo "       e.g.  export POPEX_TOKEN=\$(python3 -c 'import secrets; print(secrets.token_hex(16))')" >&2
    exit 1
fi
# The same rule as the config's (MIN_TOKEN_CHARS), checked here so a bad token is one line, not a traceback.
if (( ${#POPEX_TOKEN} < 8 )) || [[ "$POPEX_TOKEN" =~ [[:space:]] ]]; then
    echo "error: POPEX_TOKEN must be at least 8 characters without spaces (got ${#POPEX_TOKEN}); the cloud refuses to start." >&2
    exit 1
fi
[[ "$port" =~ ^[0-9]+$ ]] || { echo "error: --port must be a number, got '$port'" >&2; exit 2; }
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || { echo "error: --threads must be a positive number, got '$threads'" >&2; exit 2; }
if [[ -n "$state_dir" ]]; then
    export POPEX_CLOUD_STATE_DIR="$state_dir"
fi

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

# The worker class is gthread that buffers each connection's headers off the
# request threads (api_common/gunicorn_worker.py): slow clients hold no thread,
# and nothing is read past the headers before the route checks the token.
exec "$gunicorn" "${extra[@]}" \
    --bind "$host:$port" \
    --worker-class api_common.gunicorn_worker.BufferingThreadWorker --workers 1 --threads "$threads" \
    --timeout 120 --keep-alive 30 \
    --access-logfile - \
    'cloud_api:create_app()'
