#!/usr/bin/env bash
# Installs dependencies, builds, and starts the server on 127.0.0.1:8080 with the
# default model (../shared/models/stories260K.gguf). Extra arguments go to sieve,
# e.g. scripts/serve.sh --port 9000 --config config/sieve.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
exec ./build/sieve "$@"
