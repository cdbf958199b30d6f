#!/usr/bin/env bash
# Configures and builds sieve into ./build (Release). Extra arguments go to cmake's
# configure step, e.g. scripts/build.sh -DSIEVE_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build build -j"$(nproc)"
