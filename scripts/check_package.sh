#!/usr/bin/env bash
# Build the wheel and sdist, check them with twine, install the wheel in a fresh virtual environment (torch's CPU
# wheel first, so that pip does not pull a CUDA build) and run the command from there.
#   scripts/check_package.sh            # uses python3; PYTHON=... to choose, KEEP=1 to keep the temporary folder
# Needs build and twine (pip install -e ".[tests]") and access to a package index for the fresh environment.
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT

"$PYTHON" -m build --outdir "$TMP/dist" "$ROOT"
"$PYTHON" -m twine check --strict "$TMP"/dist/*
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install -q --upgrade pip
"$TMP/venv/bin/python" -m pip install -q "$TORCH_PIN"
"$TMP/venv/bin/python" -m pip install -q "$TMP"/dist/*.whl
cd "$TMP"   # not the source tree: the installed package must be the one imported
"$TMP/venv/bin/hf-drencoder" demo --help | head -n 1
"$TMP/venv/bin/hf-drencoder" epsilon --noise-multiplier 1 --sample-rate 0.01 --steps 100 --delta 1e-5
"$TMP/venv/bin/python" -c "import hf_drencoder.metrics as m; m.load_metric('macro_f1'); print('metric scripts installed')"
echo "package check passed"
