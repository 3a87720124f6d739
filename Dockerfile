# Gatherer's broker, worker and CLI on Debian 12 (compose.yml runs it).
#   docker build -t gatherer .
# Stage 1 builds with Debian's packages; stage 2 carries the binaries and the
# shared libraries they load, nothing else.
FROM debian:12 AS build
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      cmake ninja-build g++ pkg-config ca-certificates \
      libzmq3-dev cppzmq-dev libmsgpack-cxx-dev libboost-dev libcurl4-openssl-dev libtbb-dev \
      libspdlog-dev libfmt-dev libcli11-dev libexpected-dev nlohmann-json3-dev uuid-dev libsimdjson-dev \
      libmicrohttpd-dev libgoogle-perftools-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGATHERER_BUILD_TESTS=OFF \
      -DCMAKE_INSTALL_PREFIX=/opt/gatherer \
    && cmake --build /build -j"$(nproc)" \
    && cmake --install /build

FROM debian:12-slim
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates libzmq5 libcurl4 libtbb12 libspdlog1.10 libfmt9 libuuid1 libsimdjson14 libmicrohttpd12 \
      libtcmalloc-minimal4 python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin gatherer
COPY --from=build /opt/gatherer/bin/ /usr/local/bin/
COPY examples/ /opt/gatherer/examples/
USER gatherer
# Every flag is also an environment variable (GATHERER_BROKER, GATHERER_BIND, ...).
CMD ["gatherer-broker", "--bind", "tcp://0.0.0.0:5555"]
