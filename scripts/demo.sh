#!/usr/bin/env bash
# The README's first command: set up .venv (torch pinned to the local CPU build, then the
# project) and run the demo end to end on the small real sample in data/samples/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
python scripts/demo.py "$@"
