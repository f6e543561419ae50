#!/usr/bin/env bash
# README's second command: install what is missing, then run every check CI runs:
# ruff (lint + format), mypy, the import-linter architecture contracts, and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check src tests bench; ruff format --check src tests bench
echo "== mypy"; mypy
echo "== import-linter"; lint-imports
echo "== pytest"
pytest -n "${SIGND_TEST_WORKERS:-2}" --dist loadfile -q "$@"
