#!/usr/bin/env bash
# Create .venv (if missing) and install medxfer with its test tools into it, at the exact
# versions of requirements/lock.txt (the set the tests pass with).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c requirements/lock.txt -e ".[dev]"
