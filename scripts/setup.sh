#!/usr/bin/env bash
# Installs what signd needs on a fresh Debian machine with Python 3.11, then leaves a
# virtualenv in .venv. Usage: scripts/setup.sh [runtime|dev]
#   runtime: signd and the libraries its default (embedded) configuration uses
#   dev:     also the system services the tests start (PostgreSQL, SoftHSM2, Mosquitto)
#            and test tools
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-runtime}"
python="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=()
need_apt() { dpkg -s "$1" >/dev/null 2>&1 || apt_packages+=("$1"); }
"$python" -m venv --help >/dev/null 2>&1 || need_apt python3-venv
"$python" -c 'import ensurepip' >/dev/null 2>&1 || need_apt python3-venv
if [ "$profile" = dev ]; then
  need_apt postgresql
  need_apt softhsm2
  need_apt wrk
  need_apt mosquitto
  command -v npm >/dev/null 2>&1 || need_apt npm
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "setup: installing ${apt_packages[*]} with apt-get" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    "${apt_packages[@]}" >/dev/null
fi

"$python" -c 'import sys; assert sys.version_info >= (3, 11), "signd needs Python 3.11+"'
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
extras="aws,postgres,hsm,demo"
[ "$profile" = dev ] && extras="$extras,dev"
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [ "$profile" = dev ] && [ ! -d tests/api/e2e/node_modules ]; then
  echo "setup: installing the end-to-end test clients (hardhat, ethers) with npm ci" >&2
  (cd tests/api/e2e && npm ci --silent --no-audit --no-fund)
fi
