#!/usr/bin/env bash
# Configures and builds sieve into ./build (Release), with a Python virtual environment in
# build/venv holding the test tools (the official openai client, numpy, gguf). Extra
# arguments go to cmake's configure step, e.g. scripts/build.sh -DSIEVE_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -x build/venv/bin/python3 ]; then
  mkdir -p build
  python3 -m venv build/venv
fi
if ! build/venv/bin/python3 -c "import openai, numpy, gguf, yaml, kubernetes_validate, dockerfile_parse" 2>/dev/null; then
  build/venv/bin/python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$PWD/build/venv/bin/python3" "$@" >/dev/null
cmake --build build -j"$(nproc)"
