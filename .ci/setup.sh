#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs lmidist-jax into it.
#   bash .ci/setup.sh        the package (CPU JAX)
#   bash .ci/setup.sh test   plus the test tools (pytest, torch as the HF oracle, ...)
# Set LMIDIST_PYTHON=/path/to/python3.12 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"

find_python() {
  local candidates=("${LMIDIST_PYTHON:-}" python3.12 python3.13 python3)
  local p
  for p in /root/.pyenv/versions/3.1[2-9]*/bin/python3 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    candidates+=("$p")
  done
  for p in "${candidates[@]}"; do
    [ -n "$p" ] || continue
    if command -v "$p" >/dev/null 2>&1 &&
       "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  if ! py="$(find_python)"; then
    echo "error: lmidist-jax needs Python >= 3.12 (JAX 0.11 requires it), and none was found." >&2
    echo "  looked for: \$LMIDIST_PYTHON, python3.12, python3.13, python3, ~/.pyenv/versions/3.12*/bin/python3" >&2
    echo "  install one (e.g. 'pyenv install 3.12') or set LMIDIST_PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "creating .venv with $py ($("$py" --version))"
  rm -rf .venv
  "$py" -m venv .venv
fi

.venv/bin/python -m pip install -q --upgrade pip
if [ "$extra" = "test" ]; then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "lmidist-jax installed in .venv"
