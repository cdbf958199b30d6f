# sieve container images: CPU-only on Debian 12 slim, or CUDA on NVIDIA's CUDA images,
# chosen by the VARIANT build argument (BuildKit builds only the stages the variant needs).
#
#   docker build -t sieve:cpu .
#   docker build -t sieve:cuda --build-arg VARIANT=cuda .
#   docker run --rm -p 8080:8080 -v "$PWD/models:/models:ro" --stop-timeout 40 sieve:cpu
#   docker run --rm --gpus all -p 8080:8080 -v "$PWD/models:/models:ro" sieve:cuda
#
# Models are not baked in: mount a folder at /models. docker/entrypoint.sh starts the server
# with the container's defaults (listen on 0.0.0.0:8080, the only *.gguf in /models) under
# the user's configuration: a file mounted at /etc/sieve/sieve.json (or named by
# SIEVE_CONFIG), SIEVE_* environment variables, then flags after the image name.
# docs/config.md lists every key. The server runs as the unprivileged user sieve (10001).
#
# Build arguments: VARIANT (cpu | cuda), SIEVE_NATIVE (OFF: runs on any x86-64 CPU; ON
# tunes for the build host), DEBIAN_IMAGE, CUDA_VERSION and UBUNTU_VERSION (the
# nvidia/cuda tags), CUDA_ARCHITECTURES (the GPUs to compile for).
ARG VARIANT=cpu
ARG DEBIAN_IMAGE=debian:12-slim
ARG CUDA_VERSION=12.4.1
ARG UBUNTU_VERSION=22.04

# Package versions follow the base image's release and its security updates, so they are not
# pinned (hadolint's DL3008 is ignored on purpose).

# ---- CPU build -----------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS build-cpu
ARG SIEVE_NATIVE=OFF
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config libmicrohttpd-dev libuv1-dev libjansson-dev \
        libopenblas-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY config ./config
COPY kernels ./kernels
COPY runtime ./runtime
COPY scheduler ./scheduler
COPY server ./server
COPY bench ./bench
COPY tests ./tests
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA=OFF \
        -DSIEVE_NATIVE=${SIEVE_NATIVE} \
    && cmake --build build -j"$(nproc)" --target sieve

# ---- CUDA build (nvcc from the devel image) --------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
ARG SIEVE_NATIVE=OFF
ARG CUDA_ARCHITECTURES="80;86;89;90"
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake pkg-config libmicrohttpd-dev libuv1-dev libjansson-dev \
        libopenblas-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY config ./config
COPY kernels ./kernels
COPY runtime ./runtime
COPY scheduler ./scheduler
COPY server ./server
COPY bench ./bench
COPY tests ./tests
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSIEVE_CUDA=ON \
        -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
        -DSIEVE_NATIVE=${SIEVE_NATIVE} \
    && cmake --build build -j"$(nproc)" --target sieve

# ---- CPU runtime ------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libmicrohttpd12 libuv1 libjansson4 libopenblas0-pthread curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /src/build/sieve /usr/local/bin/sieve

# ---- CUDA runtime (the CUDA runtime and cuBLAS come with the image) -----------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libmicrohttpd12 libuv1 libjansson4 libopenblas0-pthread curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /src/build/sieve /usr/local/bin/sieve

# ---- the image --------------------------------------------------------------------------
# runtime-cpu or runtime-cuda: a stage above, not an image to tag.
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS final
COPY config/sieve.json /etc/sieve/sieve.example.json
COPY docker/entrypoint.sh /usr/local/bin/sieve-entrypoint
RUN groupadd --system --gid 10001 sieve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin sieve \
    && mkdir -p /models \
    && chmod 0755 /usr/local/bin/sieve-entrypoint
USER 10001:10001
EXPOSE 8080
VOLUME ["/models"]
STOPSIGNAL SIGTERM
# /health answers 503 while the model loads and while draining; the start period covers
# loading a large model. Set the port with SIEVE_PORT when it is not 8080.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${SIEVE_PORT:-8080}/health\" >/dev/null || exit 1"]
ENTRYPOINT ["/usr/local/bin/sieve-entrypoint"]
CMD []
