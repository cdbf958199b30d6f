#!/usr/bin/env bash
# The whole test suite under AddressSanitizer and UndefinedBehaviorSanitizer, then each fuzz
# target briefly over its corpus. Prints one closing line: "N passed, N failed".
#
#   scripts/test-sanitize.sh                 # ctest in build-asan/, then 20 s per fuzz target
#   FUZZ_SECONDS=0 scripts/test-sanitize.sh  # ctest only
#   scripts/test-sanitize.sh -R integration  # extra arguments go to ctest
#
# build-asan/ is a Debug build (asserts on, -O1) with -fsanitize=address,undefined
# -fno-sanitize-recover=undefined -fno-omit-frame-pointer and CUDA off; the integration tests
# run that build's sieve binary, so every request they make goes through the sanitized server
# (LeakSanitizer reports at exit turn the server's exit code non-zero, which the tests that
# stop the server check). The fuzz targets come from scripts/build-fuzz.sh and run with
# bench/fuzz.sh's settings; one that finds anything counts as failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh || exit 1
if [ ! -x build/venv/bin/python3 ]; then
  mkdir -p build && python3 -m venv build/venv || exit 1
fi
if ! build/venv/bin/python3 -c "import openai, numpy, gguf" 2>/dev/null; then
  build/venv/bin/python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt \
    || exit 1
fi

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# Debug (asserts on) at -O1, as the sanitizer docs advise: at -O0 the forward pass is ~10x
# slower than Release and long generations in the integration tests time out.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-g -O1" \
  -DCMAKE_C_FLAGS="$SAN" \
  -DCMAKE_EXE_LINKER_FLAGS="$SAN" -DSIEVE_CUDA=OFF \
  -DPython3_EXECUTABLE="$PWD/build/venv/bin/python3" >/dev/null || exit 1
cmake --build build-asan -j"$(nproc)" >/dev/null || {
  cmake --build build-asan -j1 2>&1 | grep -E "error|Error" | head -20
  echo "sanitize: build failed"
  echo "0 passed, 1 failed"
  exit 1
}

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

passed=0
failed=0
log=build-asan/ctest.log
(cd build-asan && ctest --output-on-failure --timeout 900 -j"$(nproc)" "$@") 2>&1 | tee "$log"
summary=$(grep -E '^[0-9]+% tests passed, [0-9]+ tests failed out of [0-9]+' "$log" | tail -1)
if [ -n "$summary" ]; then
  total=$(echo "$summary" | sed -E 's/.* out of ([0-9]+).*/\1/')
  nfail=$(echo "$summary" | sed -E 's/.*passed, ([0-9]+) tests failed.*/\1/')
  passed=$((passed + total - nfail))
  failed=$((failed + nfail))
else
  echo "sanitize: ctest printed no summary"
  failed=$((failed + 1))
fi

FUZZ_SECONDS=${FUZZ_SECONDS:-20}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  if bash scripts/build-fuzz.sh >build-asan/build-fuzz.log 2>&1; then
    rm -rf build-asan/fuzz
    FUZZ_NO_BUILD=1 FUZZ_WORK=build-asan/fuzz FUZZ_JOBS=${FUZZ_JOBS:-$(nproc)} \
      bash bench/fuzz.sh "$FUZZ_SECONDS" \
      | tee build-asan/fuzz.log
    passed=$((passed + $(grep -cE ' ok$' build-asan/fuzz.log)))
    failed=$((failed + $(grep -c 'FINDING' build-asan/fuzz.log)))
  else
    tail -20 build-asan/build-fuzz.log
    echo "sanitize: the fuzz targets did not build"
    failed=$((failed + 1))
  fi
fi
echo "sanitize: ctest in build-asan/ and fuzz targets for ${FUZZ_SECONDS} s each"
echo "${passed} passed, ${failed} failed"
[ "$failed" = 0 ]
