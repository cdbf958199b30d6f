#!/usr/bin/env bash
# compare_llamacpp.sh - sieve against llama.cpp's llama-server on this machine, in the same
# minutes. The two servers run interleaved (sieve, llama.cpp, sieve, llama.cpp, ...), one at
# a time, each on a free 127.0.0.1 port with the same thread count, and bench/serve_load.py
# loads each with the same settings. Memory bandwidth and co-tenants drift for minutes at a
# time on shared machines, so only figures taken this way are compared.
#
# llama.cpp is an out-of-tree peer: point LLAMA_SERVER (and, for --engine, LLAMA_BENCH) at
# binaries built elsewhere. Nothing from llama.cpp is part of sieve.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: LLAMA_SERVER=/path/to/llama-server [LLAMA_BENCH=/path/to/llama-bench] \
       bench/compare_llamacpp.sh [options]

What runs (default: --load; the flags add up):
  --load                aggregate output tok/s under concurrent non-streaming clients
  --prefill             one long prompt (--prefill-tokens, max_tokens 1): time to first
                        token and prefill tok/s; prompt caching off on both servers
  --engine              raw engines, no HTTP: llama-bench -p P -n N vs build/bench_runtime
                        (needs LLAMA_BENCH)

Options:
  --model PATH          GGUF model (default $SIEVE_SHARED_DIR/models/stories260K.gguf,
                        else ../shared/models/stories260K.gguf)
  --rounds N            interleaved rounds (default 2)
  --concurrency LIST    client counts for --load (default 1,4,16)
  --requests N          requests per client for --load (default 4)
  --max-tokens N        output tokens per request for --load and --engine (default 128)
  --prompt-tokens N     prompt length for --load (default 16)
  --prefill-tokens N    prompt length for --prefill and --engine (default 1499)
  --prefill-requests N  requests per --prefill measurement (default 3; the median counts)
  --bench-reps N        repetitions for --engine (default 3)
  --threads N           compute threads of each server/engine (default 2)
  --parallel N          sieve --max-running-seqs and llama-server --parallel (default 16)
  --ctx N               llama-server total context -c (default: enough for every slot)
  --sieve-args STR      extra sieve flags (word-split)
  --llama-args STR      extra llama-server flags (word-split)
  --duration-cap S      serve_load's cap per measurement (default 600)
  --verbose             also print each serve_load table
  --keep-logs           keep the work directory (server logs, JSON) and print its path
  -h, --help

Environment: LLAMA_SERVER (required for --load/--prefill), LLAMA_BENCH (for --engine),
SIEVE_BIN (default build/sieve), SIEVE_BENCH_RUNTIME (default build/bench_runtime),
PYTHON (default build/venv/bin/python3).
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/build/venv/bin/python3}
SIEVE=${SIEVE_BIN:-$ROOT/build/sieve}
BENCH_RUNTIME=${SIEVE_BENCH_RUNTIME:-$ROOT/build/bench_runtime}
SHARED=${SIEVE_SHARED_DIR:-$ROOT/../shared}
MODEL=$SHARED/models/stories260K.gguf
ROUNDS=2
CONC=1,4,16
REQS=4
MAX_TOKENS=128
PROMPT_TOKENS=16
PREFILL_TOKENS=1499
PREFILL_REQS=3
BENCH_REPS=3
THREADS=2
PARALLEL=16
CTX=0
SIEVE_ARGS=""
LLAMA_ARGS=""
CAP=600
VERBOSE=0
KEEP=0
DO_LOAD=0
DO_PREFILL=0
DO_ENGINE=0

die() { echo "compare_llamacpp: $*" >&2; exit 2; }
need_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
    opt=$1
    case $opt in
        -h|--help) usage; exit 0 ;;
        --load) DO_LOAD=1; shift; continue ;;
        --prefill) DO_PREFILL=1; shift; continue ;;
        --engine) DO_ENGINE=1; shift; continue ;;
        --verbose) VERBOSE=1; shift; continue ;;
        --keep-logs) KEEP=1; shift; continue ;;
    esac
    [[ $# -ge 2 ]] || die "$opt needs a value (see --help)"
    val=$2
    case $opt in
        --model) MODEL=$val ;;
        --rounds) need_int "$opt" "$val"; ROUNDS=$val ;;
        --concurrency) [[ $val =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] \
                           || die "--concurrency needs a list like 1,4,16"; CONC=$val ;;
        --requests) need_int "$opt" "$val"; REQS=$val ;;
        --max-tokens) need_int "$opt" "$val"; MAX_TOKENS=$val ;;
        --prompt-tokens) need_int "$opt" "$val"; PROMPT_TOKENS=$val ;;
        --prefill-tokens) need_int "$opt" "$val"; PREFILL_TOKENS=$val ;;
        --prefill-requests) need_int "$opt" "$val"; PREFILL_REQS=$val ;;
        --bench-reps) need_int "$opt" "$val"; BENCH_REPS=$val ;;
        --threads) need_int "$opt" "$val"; THREADS=$val ;;
        --parallel) need_int "$opt" "$val"; PARALLEL=$val ;;
        --ctx) need_int "$opt" "$val"; CTX=$val ;;
        --sieve-args) SIEVE_ARGS=$val ;;
        --llama-args) LLAMA_ARGS=$val ;;
        --duration-cap) need_int "$opt" "$val"; CAP=$val ;;
        *) die "unknown option '$opt' (see --help)" ;;
    esac
    shift 2
done
if [[ $DO_LOAD$DO_PREFILL$DO_ENGINE == 000 ]]; then DO_LOAD=1; fi

[[ -f $MODEL ]] || die "no model at $MODEL"
MODEL=$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")
[[ -x $PY ]] || die "no Python at $PY (run scripts/build.sh, or set PYTHON)"
if [[ $DO_LOAD == 1 || $DO_PREFILL == 1 ]]; then
    [[ -x $SIEVE ]] || die "no sieve binary at $SIEVE (run scripts/build.sh)"
    [[ -n ${LLAMA_SERVER:-} && -x ${LLAMA_SERVER:-} ]] \
        || die "set LLAMA_SERVER to an executable llama-server"
fi
if [[ $DO_ENGINE == 1 ]]; then
    [[ -x $BENCH_RUNTIME ]] || die "no $BENCH_RUNTIME (run scripts/build.sh)"
    [[ -n ${LLAMA_BENCH:-} && -x ${LLAMA_BENCH:-} ]] \
        || die "--engine needs LLAMA_BENCH set to an executable llama-bench"
fi
read -r -a SIEVE_EXTRA <<<"$SIEVE_ARGS"
read -r -a LLAMA_EXTRA <<<"$LLAMA_ARGS"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/compare-llamacpp.XXXXXX")
SERVER_PID=""
PORT=""

stop_server() {
    local pid=$SERVER_PID
    [[ -n $pid ]] || return 0
    SERVER_PID=""
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    stop_server
    if [[ $KEEP == 1 ]]; then
        echo "compare_llamacpp: logs and JSON kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$PY" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Tokens one llama-server slot must hold, rounded up to 64; -c is that times the slots.
slot_tokens() {
    local need=$(($1 + $2 + 32))
    echo $(((need + 63) / 64 * 64))
}

# start_server KIND LOG MODE: starts sieve or llama.cpp, waits for /health; sets
# SERVER_PID and PORT.
start_server() {
    local kind=$1 log=$2 mode=$3 np ctx
    local -a cmd
    PORT=$(free_port)
    if [[ $kind == sieve ]]; then
        cmd=("$SIEVE" --model "$MODEL" --host 127.0.0.1 --port "$PORT"
             --threads "$THREADS" --max-running-seqs "$PARALLEL")
        if [[ $mode == prefill ]]; then cmd+=(--prefix-caching false); fi
        cmd+=("${SIEVE_EXTRA[@]}")
    else
        if [[ $mode == prefill ]]; then
            np=1
            ctx=$(slot_tokens "$PREFILL_TOKENS" 1)
        else
            np=$PARALLEL
            ctx=$((PARALLEL * $(slot_tokens "$PROMPT_TOKENS" "$MAX_TOKENS")))
        fi
        if [[ $CTX != 0 ]]; then ctx=$CTX; fi
        cmd=("$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$PORT"
             -t "$THREADS" -tb "$THREADS" -np "$np" -c "$ctx" -cb --no-webui)
        if [[ $mode == prefill ]]; then cmd+=(--no-cache-prompt --cache-ram 0); fi
        cmd+=("${LLAMA_EXTRA[@]}")
    fi
    echo "$ ${cmd[*]}" >"$log"
    "${cmd[@]}" >>"$log" 2>&1 &
    SERVER_PID=$!
    local i
    for ((i = 0; i < 1800; i++)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            SERVER_PID=""
            echo "compare_llamacpp: $kind exited before it was ready; its log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        if curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/health"; then
            return 0
        fi
        sleep 0.1
    done
    echo "compare_llamacpp: $kind did not answer /health within 180 s (log $log)" >&2
    exit 1
}

# load KIND ROUND MODE: one serve_load measurement against a fresh server.
load() {
    local kind=$1 round=$2 mode=$3 base rc=0 args
    base=$WORK/$mode-r$round-$kind
    start_server "$kind" "$base.log" "$mode"
    if [[ $mode == prefill ]]; then
        args=(--concurrency 1 --requests-per-client "$PREFILL_REQS" --max-tokens 1
              --prompt-tokens "$PREFILL_TOKENS")
    else
        args=(--concurrency "$CONC" --requests-per-client "$REQS" --max-tokens "$MAX_TOKENS"
              --prompt-tokens "$PROMPT_TOKENS")
    fi
    "$PY" "$ROOT/bench/serve_load.py" --url "http://127.0.0.1:$PORT" "${args[@]}" \
        --stream off --duration-cap "$CAP" --json "$base.json" >"$base.txt" 2>&1 || rc=$?
    stop_server
    if [[ $VERBOSE == 1 || $rc != 0 ]]; then sed "s/^/  [$kind] /" "$base.txt" >&2; fi
    if [[ $rc != 0 ]]; then
        echo "compare_llamacpp: serve_load against $kind exited $rc (see above)" >&2
    fi
    [[ -f $base.json ]] || { echo "compare_llamacpp: no results from $kind" >&2; exit 1; }
    echo "  round $round $kind done" >&2
}

# engine ROUND: llama-bench and bench_runtime, one after the other.
engine() {
    local round=$1 base=$WORK/engine-r$1
    "$BENCH_RUNTIME" --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PREFILL_TOKENS" \
        --gen-tokens "$MAX_TOKENS" --runs "$BENCH_REPS" >"$base-sieve.txt" 2>&1 \
        || { cat "$base-sieve.txt" >&2; die "bench_runtime failed"; }
    echo "  round $round sieve (bench_runtime) done" >&2
    "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p "$PREFILL_TOKENS" -n "$MAX_TOKENS" \
        -r "$BENCH_REPS" -o json >"$base-llama.json" 2>"$base-llama.err" \
        || { cat "$base-llama.err" >&2; die "llama-bench failed"; }
    echo "  round $round llama.cpp (llama-bench) done" >&2
}

report() {
    "$PY" - "$@" <<'EOF'
import json, os, re, statistics, sys

mode, work, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def doc(kind, r):
    with open(os.path.join(work, "%s-r%d-%s.json" % (mode, r, kind))) as f:
        return json.load(f)

def ratio(a, b):
    return a / b if a and b else None

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)

def table(head, rows):
    cells = [head] + rows
    w = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for n, line in enumerate(cells):
        print("  " + "  ".join(c.rjust(x) for c, x in zip(line, w)))
        if n == 0:
            print("  " + "  ".join("-" * x for x in w))

ratios, rows = {}, []
if mode == "load":
    for r in range(1, rounds + 1):
        s, l = doc("sieve", r), doc("llama", r)
        lrows = {x["concurrency"]: x for x in l["rows"]}
        for x in s["rows"]:
            y = lrows.get(x["concurrency"])
            a, b = x["output_tok_per_s"], y and y["output_tok_per_s"]
            q = ratio(a, b)
            bad = x["errors"] or x["truncated"] or (y and (y["errors"] or y["truncated"]))
            if q is not None and not bad:
                ratios.setdefault(x["concurrency"], []).append(q)
            rows.append([str(r), str(x["concurrency"]), fmt(a, ".0f"), fmt(b, ".0f"),
                         fmt(q, ".2f") + (" !" if bad else "")])
    i = doc("sieve", 1)["info"]
    print("sieve vs llama.cpp: aggregate output tok/s, non-streaming, prompt ~%d tokens, "
          "%d output tokens, %d requests per client" % (i["prompt_tokens"], i["max_tokens"],
                                                        i["requests_per_client"]))
    table(["round", "conc", "sieve tok/s", "llama.cpp tok/s", "ratio"], rows)
elif mode == "prefill":
    for r in range(1, rounds + 1):
        line = [str(r)]
        tps = []
        for kind in ("sieve", "llama"):
            d = doc(kind, r)
            x, n = d["rows"][0], d["info"]["prompt_tokens"]
            e2e = x["e2e_ms_p50"]
            tps.append(n / (e2e / 1000.0) if e2e else None)
            line += [str(n), fmt(e2e, ".0f"), fmt(tps[-1], ".0f")]
        q = ratio(*tps)
        if q is not None:
            ratios.setdefault("prefill", []).append(q)
        rows.append(line + [fmt(q, ".2f")])
    print("sieve vs llama.cpp: one long prompt, max_tokens 1 (TTFT = median request latency "
          "incl. one decode step and HTTP), prompt caching off")
    table(["round", "sieve prompt", "sieve TTFT ms", "sieve tok/s", "llama prompt",
           "llama TTFT ms", "llama tok/s", "ratio"], rows)
else:
    for r in range(1, rounds + 1):
        with open(os.path.join(work, "engine-r%d-sieve.txt" % r)) as f:
            t = f.read()
        pm = re.search(r"^prefill\s+(\d+) tokens:\s+([\d.]+) tok/s", t, re.M)
        dm = re.search(r"^decode\s+(\d+) tokens:\s+([\d.]+) tok/s", t, re.M)
        sp, sd = (float(pm.group(2)) if pm else None), (float(dm.group(2)) if dm else None)
        with open(os.path.join(work, "engine-r%d-llama.json" % r)) as f:
            lb = json.load(f)
        lp = next((e["avg_ts"] for e in lb if e["n_prompt"] > 0 and e["n_gen"] == 0), None)
        ld = next((e["avg_ts"] for e in lb if e["n_gen"] > 0 and e["n_prompt"] == 0), None)
        qp, qd = ratio(sp, lp), ratio(sd, ld)
        if qp is not None:
            ratios.setdefault("prefill", []).append(qp)
        if qd is not None:
            ratios.setdefault("decode", []).append(qd)
        rows.append([str(r), fmt(sp, ".0f"), fmt(lp, ".0f"), fmt(qp, ".2f"),
                     fmt(sd, ".0f"), fmt(ld, ".0f"), fmt(qd, ".2f")])
    print("sieve vs llama.cpp engines (bench_runtime vs llama-bench), tok/s: prefill of the "
          "long prompt, single-stream decode")
    table(["round", "sieve pp", "llama pp", "ratio", "sieve tg", "llama tg", "ratio"], rows)
every = [q for v in ratios.values() for q in v]
for k in sorted(ratios, key=str):
    print("  median ratio (sieve / llama.cpp), %s: %.2f over %d" %
          ("conc %s" % k if mode == "load" else k, statistics.median(ratios[k]),
           len(ratios[k])))
if every:
    print("  median ratio (sieve / llama.cpp), all: %.2f over %d" %
          (statistics.median(every), len(every)))
EOF
}

echo "compare_llamacpp: model $MODEL, $THREADS threads, $ROUNDS rounds (sieve then llama.cpp)" >&2
if [[ $DO_LOAD == 1 ]]; then
    for ((r = 1; r <= ROUNDS; r++)); do
        load sieve "$r" load
        load llama "$r" load
    done
    report load "$WORK" "$ROUNDS"
fi
if [[ $DO_PREFILL == 1 ]]; then
    for ((r = 1; r <= ROUNDS; r++)); do
        load sieve "$r" prefill
        load llama "$r" prefill
    done
    report prefill "$WORK" "$ROUNDS"
fi
if [[ $DO_ENGINE == 1 ]]; then
    for ((r = 1; r <= ROUNDS; r++)); do
        engine "$r"
    done
    report engine "$WORK" "$ROUNDS"
fi
