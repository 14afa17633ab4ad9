#!/usr/bin/env bash
# Install the project (and, with --test, what the tests need) into the interpreter in $PYTHON
# (default python3). On an externally managed interpreter (Debian's own python3) a virtual
# environment .venv is created and used instead. Prints the interpreter to use on stdout's
# last line. CPU-only machines: torch==2.13.0 is installed FIRST, so nothing pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY="${PYTHON:-python3}"
stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
if [ -e "$stdlib/EXTERNALLY-MANAGED" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
  if [ ! -x .venv/bin/python ]; then
    echo "install: $PY is externally managed; creating .venv" >&2
    "$PY" -m venv .venv || { apt-get install -y --no-install-recommends python3-venv >&2 && "$PY" -m venv .venv; }
  fi
  PY="$PWD/.venv/bin/python"
fi

pipi() { "$PY" -m pip install --quiet "$@" >&2; }
if ! "$PY" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pipi "torch>=2.6"; else pipi "torch==2.13.0"; fi
fi
if [ "$want_test" = 1 ]; then pipi -e ".[test]"; else pipi -e .; fi
echo "$PY"
