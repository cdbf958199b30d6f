#!/usr/bin/env bash
# Runs each libFuzzer target for a given number of seconds and prints what it did.
#
#   bench/fuzz.sh [SECONDS] [TARGET...]      # default 60 s each, every tests/fuzz/fuzz_*.c
#   bench/fuzz.sh 600                        # the issue's "10 minutes each"
#   FUZZ_JOBS=2 bench/fuzz.sh 600            # two targets at a time (one per core)
#   bench/fuzz.sh 30 fuzz_request fuzz_gguf
#
# Builds the targets first (scripts/build-fuzz.sh; FUZZ_NO_BUILD=1 skips that). Each target
# starts from its committed seeds (tests/fuzz/corpus/TARGET, never written to) plus what
# earlier runs found (build-fuzz/corpus/TARGET, where new inputs go), with the dictionary
# tests/fuzz/dict/TARGET.dict when there is one. Crashes, leaks, timeouts (10 s per input)
# and out-of-memory inputs (2 GiB) go to build-fuzz/findings/TARGET/, the log to
# build-fuzz/logs/TARGET.log; reproduce one with build-fuzz/TARGET FILE. FUZZ_WORK=DIR puts
# corpus/, findings/ and logs/ under DIR instead of build-fuzz/; FUZZ_FLAGS adds libFuzzer
# flags. Exits 1 when any target found something.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
[ "${FUZZ_NO_BUILD:-0}" = 1 ] || bash scripts/build-fuzz.sh >/dev/null || exit 1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$src" .c)"); done
fi
export SIEVE_SHARED_DIR=${SIEVE_SHARED_DIR:-$(cd ../shared 2>/dev/null && pwd)}
W=${FUZZ_WORK:-build-fuzz}
mkdir -p "$W/logs"

run_one() {
  local t=$1 work=$W/corpus/$1 found=$W/findings/$1
  mkdir -p "$work" "$found"
  local dict=()
  [ -f "tests/fuzz/dict/$t.dict" ] && dict=(-dict="tests/fuzz/dict/$t.dict")
  # shellcheck disable=SC2086
  timeout -k 10 $((SECONDS_EACH + 120)) "build-fuzz/$t" -max_total_time="$SECONDS_EACH" \
    -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$found/" "${dict[@]}" ${FUZZ_FLAGS:-} "$work" "tests/fuzz/corpus/$t" \
    >"$W/logs/$t.log" 2>&1
  echo $? >"$W/logs/$t.rc"
}

echo "fuzz: ${#targets[@]} targets, ${SECONDS_EACH} s each, ${FUZZ_JOBS:-1} at a time"
running=0
for t in "${targets[@]}"; do
  [ -x "build-fuzz/$t" ] || { echo "fuzz: no build-fuzz/$t" >&2; exit 1; }
  rm -f "$W/logs/$t.rc"
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "${FUZZ_JOBS:-1}" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait

failed=0
printf '%-20s %12s %9s %7s %7s %s\n' target runs exec/s cov corpus result
for t in "${targets[@]}"; do
  log=$W/logs/$t.log
  rc=$(cat "$W/logs/$t.rc" 2>/dev/null || echo 1)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{print $2}')
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{print $2}')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(ls "$W/corpus/$t" | wc -l)
  found_dir=$W/findings/$t/
  if [ "$rc" = 0 ]; then
    result=ok
  else
    result="FINDING (exit $rc): $found_dir$(ls -t "$W/findings/$t" | head -1) -- see $log"
    failed=$((failed + 1))
  fi
  printf '%-20s %12s %9s %7s %7s %s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "$corpus" "$result"
done
[ "$failed" = 0 ]
