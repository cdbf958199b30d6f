#!/usr/bin/env bash
# tests/gpu/run.sh - the one prepared command for a session that is lent a GPU (an H200:
# sm_90). It builds the CUDA kernels for the GPU into build-gpu/, prints nvidia-smi, runs
# every CUDA kernel against its CPU twin (test_cuda_twins) and the threads all-reduce
# (test_collective), the whole forward pass on the GPU (test_cuda_forward: the golden greedy
# tokens, logits against the CPU forward pass, mixed paged batches, decode steps replayed
# from CUDA graphs against eager ones, FlexPrefill and PowerAttention prefill against the
# CPU's tokens, logits and block counts, and the staged qwen2, scaled-RoPE and Q4_K models;
# with two GPUs or more also tensor parallelism over NCCL against tp 1 and the golden
# tokens, which one GPU cannot run: it says so and skips), decode tok/s with CUDA graphs
# and without (bench_decode_cuda: batch 1, 16 and 64 on stories260K and a staged model,
# and tp 2 with two GPUs), then the kernel micro-benchmarks against the CPU twins (bench_cuda:
# elementwise ops, cuBLAS/half-weight products, a Llama-3-8B bf16 decode weight stream
# against the HBM roofline, paged attention decode and causal prefill), the KV-compression
# and sparse-prefill benchmarks (bench_cuda --only kvq,sparse: decode attention over int8,
# int4 and zip4/2 pages against fp decode at 32K context and batch 16, block-sparse prefill
# at 8K and 32K with a 10% selection against dense), and PyTorch's
# scaled_dot_product_attention on the same attention shapes for reference. Expected wall
# time: 4 to 6 minutes (build 1-2, tests about 1, benchmarks 2-3); every step has its own
# time limit and the whole stays under 8 minutes (bench_decode_cuda adds about 15 s).
#
#   tests/gpu/run.sh                 on the device machine, from the repository root
#   tests/gpu/run.sh --stage-deps    on a development machine, before the device call
#
# Building: when the machine has every library the project's CMake needs, the project is
# configured with -DSIEVE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 into build-gpu/. When it
# does not (the device image is a CUDA + PyTorch image), only what the GPU checks need is
# compiled directly (kernels/, runtime/, the three tests, the benchmark) into
# build-gpu/direct/; that needs OpenBLAS, cmocka and jansson, from the machine or from
# build-gpu-deps/, which --stage-deps fills here (headers and shared libraries copied from
# this machine, the test model and golden files of ../shared, and small generated models;
# about 45 MB): then name build-gpu-deps in the device call's carry.
#
# Environment: SIEVE_GPU_ARCH (default 90), SIEVE_GPU_QUICK=1 (smaller benchmarks),
# SIEVE_GPU_BUILD=direct (skip the project's CMake),
# OUT (when set, the whole log is also written to $OUT/gpu-run.log).
# Exit status: 0 when the build and the three tests passed (benchmarks only print).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

ARCH="${SIEVE_GPU_ARCH:-90}"
DEPS="build-gpu-deps"
JOBS="$(nproc)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"

# ---- --stage-deps: copy OpenBLAS and cmocka for a machine that lacks them ----
stage_deps() {
    rm -rf "$DEPS"
    mkdir -p "$DEPS/include" "$DEPS/lib"
    local blas_inc blas_lib cm_inc cm_lib so
    blas_inc="$(pkg-config --cflags-only-I openblas | sed 's/^-I//; s/ *$//')"
    blas_lib="$(pkg-config --variable=libdir openblas)"
    cm_inc="$(pkg-config --variable=includedir cmocka)"
    cm_lib="$(pkg-config --variable=libdir cmocka)"
    cp "${blas_inc:-/usr/include}"/cblas.h "${blas_inc:-/usr/include}"/openblas_config.h \
        "$DEPS/include/" || return 1
    cp "${cm_inc:-/usr/include}/cmocka.h" "$DEPS/include/" || return 1
    local js_inc js_lib
    js_inc="$(pkg-config --variable=includedir jansson)"
    js_lib="$(pkg-config --variable=libdir jansson)"
    cp "${js_inc:-/usr/include}"/jansson.h "${js_inc:-/usr/include}"/jansson_config.h \
        "$DEPS/include/" || return 1
    cp "$(readlink -f "${js_lib:-/usr/lib/x86_64-linux-gnu}/libjansson.so.4")" \
        "$DEPS/lib/libjansson.so.4" || return 1
    # Real files under their sonames (links may not travel): linked with -l:NAME.
    so="$(readlink -f "$blas_lib/libopenblas.so.0")"
    cp "$so" "$DEPS/lib/libopenblas.so.0" || return 1
    cp "$(readlink -f "${cm_lib:-/usr/lib/x86_64-linux-gnu}/libcmocka.so.0")" \
        "$DEPS/lib/libcmocka.so.0" || return 1
    # OpenBLAS's own needs beyond the C runtime (libgfortran, libquadmath).
    ldd "$so" | awk '$3 ~ /^\// {print $1, $3}' | while read -r name path; do
        case "$name" in libc.so* | libm.so* | libgcc_s.so* | libpthread.so* | ld-linux*) ;;
        *) cp "$(readlink -f "$path")" "$DEPS/lib/$name" ;;
        esac
    done
    # The golden test's model and references (the device machine has no ../shared).
    local shared="${SIEVE_SHARED_DIR:-../shared}"
    mkdir -p "$DEPS/shared/models" "$DEPS/shared/golden"
    cp "$shared/models/stories260K.gguf" "$DEPS/shared/models/" || return 1
    cp "$shared"/golden/*.json "$DEPS/shared/golden/" || return 1
    # Small models for the paths stories260K does not take: qwen2 (q/k/v biases, NeoX
    # RoPE), Llama 3 scaled RoPE (rope_freqs) in F16, and Q4_K weights (dequantized at load).
    local py=python3
    [ -x build/venv/bin/python3 ] && py=build/venv/bin/python3
    mkdir -p "$DEPS/models"
    if "$py" -c "import numpy, gguf" 2>/dev/null; then
        "$py" tools/gen_model.py --preset tiny --arch qwen2 --gguf "$DEPS/models/qwen2-f32.gguf" &&
            "$py" tools/gen_model.py --preset tiny --rope-scaling llama3 --type f16 \
                --gguf "$DEPS/models/llama3-rope-f16.gguf" &&
            "$py" tools/gen_model.py --preset tiny --type q4_k \
                --gguf "$DEPS/models/llama-q4_k.gguf" >/dev/null || return 1
    else
        echo "no numpy + gguf for $py: the generated models are not staged"
    fi
    du -sh "$DEPS"
    echo "staged: name \"$DEPS\" in the device call's carry"
}

if [ "${1:-}" = "--stage-deps" ]; then
    stage_deps
    exit $?
fi

LOG=/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    LOG="$OUT/gpu-run.log"
fi
exec > >(tee "$LOG") 2>&1

T0=$(date +%s)
step() { printf '\n===== %s (t+%ds) =====\n' "$1" $(($(date +%s) - T0)); }
STATUS=0
fail() {
    echo "FAIL: $*"
    STATUS=1
}

step "machine"
date -u
uname -m
echo "cores: $JOBS"
"$NVCC" --version | tail -2
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true

# ---- build ----
cmake_build() {
    mkdir -p build-gpu
    cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >build-gpu/configure.log 2>&1 || return 1
    cmake --build build-gpu -j"$JOBS" --target test_cuda_twins test_collective test_cuda_forward \
        bench_cuda bench_decode_cuda || return 2
    BIN=build-gpu
}

direct_build() {
    local B=build-gpu/direct
    rm -rf "$B"
    mkdir -p "$B/obj"
    local cflags=(-std=c17 -O3 -march=native -fopenmp-simd -D_GNU_SOURCE -DSIEVE_VERSION=\"gpu\"
        -DSIEVE_HAVE_CUDA=1 -I. -Wall -Wextra -Wno-unused-parameter)
    local nvflags=(-O3 -std=c++17 "--generate-code=arch=compute_$ARCH,code=[compute_$ARCH,sm_$ARCH]"
        -DSIEVE_HAVE_CUDA=1 -I. -forward-unknown-to-host-compiler -Wall -Wextra)
    local libs=(-L"$CUDA_HOME/lib64" -lcublas -lcudart)
    if pkg-config --exists openblas cmocka jansson 2>/dev/null; then
        # shellcheck disable=SC2207
        cflags+=($(pkg-config --cflags openblas cmocka jansson))
        # shellcheck disable=SC2207
        libs+=($(pkg-config --libs openblas cmocka jansson))
    elif [ -f "$DEPS/include/cblas.h" ] && [ -f "$DEPS/include/jansson.h" ]; then
        cflags+=(-I"$DEPS/include")
        # shellcheck disable=SC2054 # -Wl,-rpath,DIR is one argument
        libs+=(-L"$PWD/$DEPS/lib" -Wl,-rpath,"$PWD/$DEPS/lib" -l:libopenblas.so.0 -l:libcmocka.so.0
            -l:libjansson.so.4)
    else
        echo "no OpenBLAS, cmocka and jansson here: run tests/gpu/run.sh --stage-deps on a development"
        echo "machine and name $DEPS in the device call's carry"
        return 1
    fi
    if [ -f "$CUDA_HOME/include/nccl.h" ] && ls "$CUDA_HOME"/lib64/libnccl.so* >/dev/null 2>&1; then
        cflags+=(-DSIEVE_HAVE_NCCL=1)
        nvflags+=(-DSIEVE_HAVE_NCCL=1)
        libs+=(-lnccl)
    fi
    local pids=() f
    mkdir -p "$B/rt"
    for f in kernels/*.c kernels/cpu/*.c; do
        [ -e "$f" ] || continue
        gcc "${cflags[@]}" -c "$f" -o "$B/obj/$(basename "$f" .c).o" &
        pids+=($!)
    done
    # The runtime (the forward pass on either backend) for test_cuda_forward and
    # bench_decode_cuda only.
    for f in runtime/*.c; do
        gcc "${cflags[@]}" -c "$f" -o "$B/rt/$(basename "$f" .c).o" &
        pids+=($!)
    done
    for f in kernels/cuda/*.cu; do
        "$NVCC" "${nvflags[@]}" -c "$f" -o "$B/obj/$(basename "$f" .cu).cu.o" &
        pids+=($!)
    done
    local ok=0
    for f in "${pids[@]}"; do wait "$f" || ok=1; done
    [ $ok -eq 0 ] || return 2
    local t
    for t in tests/unit/test_cuda_twins.c tests/unit/test_collective.c bench/bench_cuda.c; do
        gcc "${cflags[@]}" "$t" "$B"/obj/*.o "${libs[@]}" -lstdc++ -lpthread -lm \
            -o "$B/$(basename "$t" .c)" || return 2
    done
    for t in tests/unit/test_cuda_forward.c bench/bench_decode_cuda.c; do
        gcc "${cflags[@]}" "$t" "$B"/rt/*.o "$B"/obj/*.o "${libs[@]}" -lstdc++ -lpthread -lm \
            -o "$B/$(basename "$t" .c)" || return 2
    done
    BIN="$B"
}

step "build (sm_$ARCH)"
BIN=""
if [ "${SIEVE_GPU_BUILD:-auto}" != direct ] && cmake_build; then
    echo "built with the project's CMake into build-gpu/"
else
    echo "not built with the project's CMake (SIEVE_GPU_BUILD=${SIEVE_GPU_BUILD:-auto};"
    echo "build-gpu/configure.log ends:)"
    tail -5 build-gpu/configure.log 2>/dev/null
    echo "building the kernels, tests and benchmark directly"
    direct_build || BIN=""
fi
if [ -z "$BIN" ]; then
    fail "build"
    exit 1
fi
if [ -z "${SIEVE_SHARED_DIR:-}" ]; then
    SIEVE_SHARED_DIR="$PWD/shared"
    [ -f "$SIEVE_SHARED_DIR/models/stories260K.gguf" ] || SIEVE_SHARED_DIR="$PWD/$DEPS/shared"
fi
export SIEVE_SHARED_DIR
export LD_LIBRARY_PATH="$CUDA_HOME/lib64:${LD_LIBRARY_PATH:-}"
# Staged libraries need each other too (OpenBLAS -> libgfortran): a run path covers only
# the binary's own needs.
[ -d "$DEPS/lib" ] && export LD_LIBRARY_PATH="$PWD/$DEPS/lib:$LD_LIBRARY_PATH"

step "test_cuda_twins: every CUDA kernel against its CPU twin"
timeout 300 "$BIN/test_cuda_twins" || fail "test_cuda_twins (status $?)"

step "test_collective: the threads all-reduce"
timeout 120 "$BIN/test_collective" || fail "test_collective (status $?)"

step "test_cuda_forward: the forward pass on the GPU (golden greedy, logits against the CPU)"
MODELS=""
for f in "$DEPS"/models/*.gguf; do
    [ -f "$f" ] && MODELS="${MODELS:+$MODELS:}$PWD/$f"
done
echo "shared: $SIEVE_SHARED_DIR; extra models: ${MODELS:-none}"
SIEVE_CUDA_FORWARD_MODELS="$MODELS" timeout 180 "$BIN/test_cuda_forward" ||
    fail "test_cuda_forward (status $?)"

GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
step "bench_decode_cuda: decode tok/s with CUDA graphs and eagerly ($GPUS GPU(s))"
timeout 60 "$BIN/bench_decode_cuda" --batch 1,16,64 --steps 200 ||
    echo "bench_decode_cuda stopped (status $?)"
if [ -f "$DEPS/models/llama3-rope-f16.gguf" ]; then
    timeout 45 "$BIN/bench_decode_cuda" --model "$DEPS/models/llama3-rope-f16.gguf" \
        --batch 1,64 --steps 150 || echo "bench_decode_cuda stopped (status $?)"
fi
if [ "${GPUS:-0}" -ge 2 ]; then
    timeout 45 "$BIN/bench_decode_cuda" --tp 2 --batch 1,64 --steps 150 ||
        echo "bench_decode_cuda --tp 2 stopped (status $?)"
else
    echo "tensor parallelism (tp > 1) needs several GPUs, one per rank; this machine has" \
        "${GPUS:-0}: its CUDA tests (in test_cuda_forward) and benchmark are skipped"
fi

step "bench_cuda: GPU kernels against the CPU twins"
QUICK=()
[ "${SIEVE_GPU_QUICK:-0}" = 1 ] && QUICK=(--quick)
timeout 300 "$BIN/bench_cuda" "${QUICK[@]}" --only elementwise,embed,matmul,stream,attention ||
    echo "bench_cuda stopped (status $?)"

step "bench_cuda: KV int8/zip decode against fp, block-sparse prefill (10%) against dense"
timeout 150 "$BIN/bench_cuda" "${QUICK[@]}" --only kvq,sparse ||
    echo "bench_cuda kvq,sparse stopped (status $?)"

step "PyTorch scaled_dot_product_attention on the same shapes (reference)"
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    timeout 180 python3 - <<'EOF' || echo "SDPA reference stopped (status $?)"
import torch
import torch.nn.functional as F

HQ, HKV, HD = 32, 8, 128


def seconds(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def sdpa(q, k, v, causal):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # older torch: expand the kv heads
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=causal)


print("torch", torch.__version__, torch.cuda.get_device_name())
for dt in (torch.bfloat16, torch.float32):
    for n in (1024, 8192, 32768):
        q = torch.randn(1, HQ, n, HD, device="cuda", dtype=dt)
        k = torch.randn(1, HKV, n, HD, device="cuda", dtype=dt)
        v = torch.randn(1, HKV, n, HD, device="cuda", dtype=dt)
        t = seconds(lambda: sdpa(q, k, v, True), 3 if n > 8192 else 10)
        flop = 4.0 * HQ * HD * n * (n + 1) / 2
        print(f"sdpa prefill {str(dt):15s} {n:6d} tokens causal: {t * 1e6:12.1f} us "
              f"{flop / t / 1e12:8.1f} TFLOP/s")
        del q, k, v
    for ns, ctx in ((1, 4096), (64, 4096), (1, 32768), (64, 32768)):
        q = torch.randn(ns, HQ, 1, HD, device="cuda", dtype=dt)
        k = torch.randn(ns, HKV, ctx, HD, device="cuda", dtype=dt)
        v = torch.randn(ns, HKV, ctx, HD, device="cuda", dtype=dt)
        t = seconds(lambda: sdpa(q, k, v, False), 10)
        gb = 2.0 * ns * ctx * HKV * HD * k.element_size() / 1e9
        print(f"sdpa decode  {str(dt):15s} {ns:3d} seqs x ctx {ctx:6d}: {t * 1e6:12.1f} us "
              f"{gb / t:8.1f} GB/s")
        del q, k, v
EOF
else
    echo "no PyTorch with CUDA here: skipped"
fi

step "summary"
if [ $STATUS -eq 0 ]; then
    echo "PASS: build, test_cuda_twins, test_collective, test_cuda_forward"
else
    echo "FAILED: see the FAIL lines above"
fi
exit $STATUS
