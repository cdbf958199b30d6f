#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (cmocka unit tests and
# the integration tests that start the real server on a free loopback port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
cd build
ctest --output-on-failure --timeout 600 -j"$(nproc)"
