# syntax=docker/dockerfile:1
# LoRA Fleet operator image for users with Docker; hack/images.sh builds the same image without a daemon (mmdebstrap
# + buildah, docs/images.md) and tests/foundation/test_docker.py checks that the two recipes agree. From the repo root:
#   docker build -f docker/operator.Dockerfile --build-arg REVISION="$(git rev-parse HEAD)" \
#     -t ghcr.io/lorafleet/operator:0.1.0 .
# The operator never imports torch, so the wheel is installed without its dependencies and only the operator's own
# (docker/operator-requirements.txt, pinned with hashes by `bash hack/images.sh lock`) are added: a small image.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY lorafleet ./lorafleet
COPY operator ./operator
COPY worker ./worker
COPY docker/operator-requirements.txt /tmp/requirements.txt
# pip runs from a throwaway venv, so /opt/lorafleet keeps no pip of its own (as with hack/images.sh's uv).
RUN python3 -m venv /tmp/pip \
 && /tmp/pip/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && python3 -m venv --without-pip /opt/lorafleet \
 && /tmp/pip/bin/pip --python /opt/lorafleet/bin/python install --no-deps --require-hashes -r /tmp/requirements.txt \
 && /tmp/pip/bin/pip --python /opt/lorafleet/bin/python install --no-deps /wheels/*.whl

FROM debian:bookworm-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/lorafleet/lorafleet" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.title="lorafleet-operator"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 lorafleet && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lorafleet
COPY --from=build /opt/lorafleet /opt/lorafleet
ENV PATH=/opt/lorafleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -c "import lorafleet.operator.main"
# Matches runAsUser/runAsGroup in manifests/ and the chart (restricted Pod Security).
USER 65532:65532
# 8080: /metrics, 8081: /healthz (kopf liveness).
EXPOSE 8080 8081
ENTRYPOINT ["lorafleet"]
CMD ["operator", "--all-namespaces", "--peering=lorafleet"]
