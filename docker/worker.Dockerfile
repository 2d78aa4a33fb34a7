# syntax=docker/dockerfile:1
# LoRA Fleet worker image (engine + OpenAI/vLLM-compatible API). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/lorafleet/worker:0.1.0 .
# PyPI's torch wheels bundle the CUDA runtime, so a plain Python base works on GPU nodes with the NVIDIA container
# toolkit; Triton kernels compile at first use into $TRITON_CACHE_DIR (a writable volume).

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
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton
# Triton JIT needs a C compiler at runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
# The wheel's own metadata carries every pinned dependency (torch==2.13.0, transformers, peft, ...).
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && python -c "import lorafleet.worker"
RUN mkdir -p /cache /var/lib/lorafleet && chown 65532:65532 /cache /var/lib/lorafleet
USER 65532:65532
VOLUME ["/cache", "/var/lib/lorafleet"]
EXPOSE 8000
ENTRYPOINT ["lorafleet"]
CMD ["worker"]
