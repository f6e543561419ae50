#!/usr/bin/env bash
# README's first command: install what is missing, then run signd's main job with embedded
# defaults (no cloud account, no manual set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh runtime
exec .venv/bin/signd demo "$@"
