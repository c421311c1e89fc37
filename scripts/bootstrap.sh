#!/usr/bin/env bash
# Create .venv and install requirements.txt; a no-op when nothing changed.
# Sourced by run_tests.sh and run_demo.sh so that each of them is the only
# command a fresh machine needs.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $("$python_bin" --version 2>&1)"
    "$python_bin" -m venv .venv
fi

stamp=.venv/.requirements.sha256
wanted="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "[bootstrap] installing requirements.txt (torch==2.13.0 CPU; first run takes a few minutes)"
    # POPEX_PIP_ARGS, when set (even empty), is passed to pip as it is, e.g.
    # POPEX_PIP_ARGS="--extra-index-url https://mirror/whl/cpu". Unset: ask pip
    # (a dry run) which torch wheel it would take; unless that is a local file or
    # a +cpu build, add PyTorch's CPU index, because the public index's Linux
    # wheel pulls gigabytes of CUDA packages (the +cpu version sorts above it).
    if [ -n "${POPEX_PIP_ARGS+set}" ]; then
        pip_args="$POPEX_PIP_ARGS"
    else
        pip_args=""
        torch_pin="$(grep -E '^torch==' requirements.txt | head -n 1 | cut -d' ' -f1)"
        torch_url="$(.venv/bin/python -m pip install --dry-run --no-deps --quiet --ignore-installed --report - \
                "$torch_pin" 2>/dev/null | .venv/bin/python -c \
                'import json, sys; print(" ".join(i["download_info"]["url"] for i in json.load(sys.stdin)["install"]))' \
                2>/dev/null || true)"
        case "$torch_url" in
            file:*|*+cpu*|*%2Bcpu*) ;;
            *) pip_args="--extra-index-url https://download.pytorch.org/whl/cpu"
               echo "[bootstrap] no local CPU torch wheel: adding PyTorch's CPU index (set POPEX_PIP_ARGS to override)" ;;
        esac
    fi
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --quiet $pip_args -r requirements.txt
    echo "$wanted" > "$stamp"
fi

# Full Fashion-MNIST is optional (training, full-size experiments); the demo and
# tests fall back to the 1,000-image subset shipped in data/.
fm_root=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm_root/t10k-images-idx3-ubyte.gz" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && [ -z "${POPEX_NO_APT:-}" ]; then
    echo "[bootstrap] installing Debian's dataset-fashion-mnist (set POPEX_NO_APT=1 to skip)"
    if ! { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; }; then
        echo "[bootstrap] could not install dataset-fashion-mnist; using the shipped test subset"
    fi
fi
# nginx (Debian's) for tests/test_scale_out.py: two cloud replicas behind a real balancer on loopback.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && [ -z "${POPEX_NO_APT:-}" ]; then
    echo "[bootstrap] installing Debian's nginx-light for the scale-out test (set POPEX_NO_APT=1 to skip)"
    if ! { apt-get install -y -qq nginx-light >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nginx-light >/dev/null 2>&1; }; }; then
        echo "[bootstrap] could not install nginx-light; tests/test_scale_out.py will be skipped"
    fi
fi
