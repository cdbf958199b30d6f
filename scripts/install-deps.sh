#!/usr/bin/env bash
# Installs what sieve needs to build and test on Debian 12 (run as root, or with sudo
# available). Does nothing when everything is already there, so it is cheap to call
# from every other script.
set -euo pipefail

PKGS=(build-essential cmake pkg-config libmicrohttpd-dev libuv1-dev libjansson-dev
      libopenblas-dev libcmocka-dev curl python3 python3-venv shellcheck dash)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Optional: headless Chromium for the chat page's browser test (skipped without it).
if ! command -v chromium >/dev/null 2>&1 && [ "${SIEVE_SKIP_BROWSER:-0}" != 1 ]; then
  echo "install-deps: installing chromium (browser test of the chat page)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium \
    >/dev/null 2>&1 || echo "install-deps: chromium unavailable; its test will be skipped"
fi

# Fuzzing (scripts/build-fuzz.sh, bench/fuzz.sh, scripts/test-sanitize.sh): clang with
# libFuzzer and the sanitizer runtimes. SIEVE_SKIP_CLANG=1 skips it.
if [ "${SIEVE_SKIP_CLANG:-0}" != 1 ]; then
  fuzz_missing=()
  for p in clang libclang-rt-14-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || fuzz_missing+=("$p")
  done
  if [ ${#fuzz_missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${fuzz_missing[*]} (fuzz targets)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${fuzz_missing[@]}"
  fi
fi
