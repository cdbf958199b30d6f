# sieve container image (CPU build on Debian 12 slim).
#
#   docker build -t sieve .
#   docker run -p 8080:8080 -v /path/to/models:/models sieve --model /models/model.gguf
#
# The build stage compiles with -DSIEVE_NATIVE=OFF so the image runs on any x86-64 CPU
# (pass --build-arg SIEVE_NATIVE=ON to tune for the build host). Models are not baked in:
# mount them as a volume. The server listens on 0.0.0.0:8080 inside the container.
ARG DEBIAN_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS build
ARG SIEVE_NATIVE=OFF
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
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

FROM ${DEBIAN_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libmicrohttpd12 libuv1 libjansson4 libopenblas0-pthread curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sieve
COPY --from=build /src/build/sieve /usr/local/bin/sieve
COPY config/sieve.json /etc/sieve/sieve.json
USER sieve
EXPOSE 8080
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["/usr/local/bin/sieve", "--config", "/etc/sieve/sieve.json", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "/models/stories260K.gguf"]
