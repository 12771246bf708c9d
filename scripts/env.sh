# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment in .venv with the pinned packages.
# torch is pinned by constraints.txt to the CPU build (an unpinned torch pulls several GB of CUDA packages).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
.venv/bin/python -c "import smoothcert, torch, statsmodels" || { echo "installation failed" >&2; exit 1; }
