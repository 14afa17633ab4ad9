#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian's slurm-wlm + munge, the test
# extra), then runs pytest.
# Also Debian's prometheus + pushgateway for the monitoring tests (started and stopped by the tests). The tests start a single-node Slurm themselves and stop it by PID.
# And Debian's chromium: the plan page (memory_predictor report) is rendered in a real headless browser;
# iproute2 and util-linux (ip, tc, nsenter, unshare) for the 3-node Slurm of the multi-node tests.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || need+=(prometheus-pushgateway)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# the 3-node Slurm of the multi-node tests: network namespaces, veth pairs, a bridge, netem
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || [ -x /usr/bin/nsenter ] || need+=(util-linux)
command -v ps >/dev/null 2>&1 || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]} (Debian)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
PY=$(bash scripts/install.sh --test | tail -n 1)
exec "$PY" -m pytest -q -ra "$@"
