#!/usr/bin/env bash
# Set up and run the embedded default: the tiny Llama on this machine (cluster=local).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/install.sh | tail -n 1)
exec "$PY" -m launcher config=tiny_local "$@"
