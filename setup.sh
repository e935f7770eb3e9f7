#!/usr/bin/env bash
# Create a fresh virtual environment in .venv and install honeypotnet with its test, serve, art and timm extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
rm -rf .venv
"$PY" -m venv .venv
# torch first, pinned to a release every user can get (CPU or CUDA); then the package itself.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[serve,test,art,timm]"
echo "honeypotnet installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
