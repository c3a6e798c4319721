# reefcap caption server. CPU image by default; the GPU image (CUDA torch + onnxruntime-gpu) with
#   docker build --build-arg VARIANT=gpu -t reefcap:gpu .
# The steps mirror the Makefile's install: the pinned torch first, then the project with its extras.
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# The CPU wheel index keeps gigabytes of CUDA libraries out of the CPU image; the GPU variant uses PyPI's CUDA wheel.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# The plain install serves (/v1/captions, /v1/feedback and its BLEU/CIDEr included); name extras to add more,
# e.g. --build-arg EXTRAS=train for training and METEOR inside the image (METEOR also needs a Java runtime).
ARG EXTRAS=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REEFCAP_HOST=0.0.0.0 \
    REEFCAP_PORT=8000 \
    REEFCAP_FEEDBACK_DB=/data/reefcap-feedback.sqlite3

RUN groupadd --system --gid 10001 reefcap \
    && useradd --system --uid 10001 --gid reefcap --home-dir /app --shell /usr/sbin/nologin reefcap \
    && mkdir -p /app /data \
    && chown reefcap:reefcap /data

WORKDIR /app

RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md ./
COPY reefcap ./reefcap
COPY models ./models
# training/ is part of the package (its commands register with the CLI); its extra's dependencies are not.
COPY training ./training
COPY server ./server
COPY clients ./clients
# bench/ installs too (reefcap bench); the serving path never imports it.
COPY bench ./bench

# onnxruntime-gpu replaces onnxruntime (pip cannot hold both), as pyproject's gpu extra explains.
# The project itself is the local source (no version to pin); its dependencies' ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[${EXTRAS}]}" \
    && if [ "$VARIANT" = "gpu" ]; then \
        pip uninstall -y onnxruntime && pip install "onnxruntime-gpu>=1.20"; \
    fi

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('REEFCAP_PORT', '8000')}/healthz\", timeout=4)"]

CMD ["reefcap", "serve"]
