#!/usr/bin/env bash
# Installs the peer servers of `python -m bench.peers` into .bench-venv/ (apart from the service's .venv),
# and TorchServe's Java runtime. Idempotent: reinstalls only when requirements.txt is newer than the venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${BENCH_VENV:-.bench-venv}
REQS=bench/peers/requirements.txt

if ! command -v java >/dev/null; then
    apt-get install -y openjdk-17-jre-headless || sudo apt-get install -y openjdk-17-jre-headless
fi
if [[ ! -f $VENV/.installed || $REQS -nt $VENV/.installed ]]; then
    test -x "$VENV/bin/python" || "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQS"
    touch "$VENV/.installed"
fi
echo "peer servers ready in $VENV"
