# syntax=docker/dockerfile:1
# LoRA Fleet operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/lorafleet/operator:0.1.0 .
# The operator never imports torch, so the package is installed without its dependencies and only the operator's
# own (pinned as in pyproject.toml; tests/foundation/test_docker.py checks the pins) are added: a small image.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY lorafleet ./lorafleet
COPY operator ./operator
COPY worker ./worker
RUN pip install --no-cache-dir "setuptools>=69" wheel \
 && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install \
      "kopf==1.45.2" \
      "kubernetes==36.0.3" \
      "ortools==9.15.6755" \
      "prometheus-client==0.26.0" \
      "pydantic==2.14.3" \
      "httpx>=0.27" \
      "pyyaml>=6"
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels \
 && python -c "import lorafleet.operator.main"
# Matches runAsUser/runAsGroup in manifests/ and the chart (restricted Pod Security).
USER 65532:65532
# 8080: /metrics, 8081: /healthz (kopf liveness).
EXPOSE 8080 8081
ENTRYPOINT ["lorafleet"]
CMD ["operator", "--all-namespaces", "--peering=lorafleet"]
