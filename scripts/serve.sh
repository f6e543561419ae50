#!/usr/bin/env bash
# README's first command: install what is missing, then run signd's main job, `signd serve`,
# with embedded defaults (local enclave and kms-server processes, SQLite, filesystem blobs,
# 127.0.0.1:8645, a development client it prints how to use): no cloud account, no set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh runtime
exec .venv/bin/signd serve "$@"
