# syntax=docker/dockerfile:1
# tlserve images. Targets:
#   cpu      slim serving image, ONNX Runtime CPU build (default: last stage)
#   gpu      serving image on NVIDIA CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu
#   trainer  torch + torchvision, for fine-tuning and export jobs on the cluster
# Serving images contain no torch. All images run as uid 10001 and write only under /tmp
# (mount an emptyDir there) and mounted volumes, so a read-only root filesystem works.
# Models: mount a repository on /models (default), or bake one in:
#   docker build --target gpu --build-arg MODEL_REPOSITORY=models -t tlserve:gpu .
ARG ORT_VERSION=1.31.1

# Base images are written out (not ARGs) so scanners can check their tags; change both places together.
# ---------------------------------------------------------------- source (copied, never installed here)
FROM python:3.11.14-slim-bookworm AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tlserve/ tlserve/
COPY server/ server/
COPY trainer/ trainer/
COPY export/ export/
COPY proto/ proto/

# ---------------------------------------------------------------- requirements: each image's dependency list
# Listed from pyproject.toml's extras; the build stages COPY only their list, so their dependency layer is rebuilt
# when that list changes, not when the sources or another part of pyproject.toml do.
FROM python:3.11.14-slim-bookworm AS requirements
ARG ORT_VERSION
WORKDIR /deps
COPY pyproject.toml deploy/docker/requirements.py ./
# The serve extra selects onnxruntime-gpu on linux/x86_64; the slim image takes the CPU build instead. The train
# extra has no onnxruntime, but `tlserve export` verifies with it on the CPU.
RUN python requirements.py pyproject.toml serve,tracing --onnxruntime "onnxruntime==${ORT_VERSION}" > serve-cpu.txt \
 && python requirements.py pyproject.toml serve,tracing > serve.txt \
 && python requirements.py pyproject.toml train --onnxruntime "onnxruntime==${ORT_VERSION}" > train.txt

# ---------------------------------------------------------------- cpu: build the virtualenv
FROM python:3.11.14-slim-bookworm AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Dependencies first, then the sources with --no-deps: a source change reuses the dependency layer.
COPY --from=requirements /deps/serve-cpu.txt /deps/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /deps/requirements.txt \
 && /opt/venv/bin/python -m compileall -q /opt/venv
COPY --from=source /src /src
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps "/src[serve]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib/python3.11/site-packages/tlserve

# ---------------------------------------------------------------- gpu: build the virtualenv on the CUDA base
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# Accepted hadolint DL3008 (unpinned apt packages): the Ubuntu archive drops superseded versions, so
# exact pins break rebuilds; the base image tag pins the release and its package set.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=requirements /deps/serve.txt /deps/requirements.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /deps/requirements.txt \
 && /opt/venv/bin/python -m compileall -q /opt/venv
COPY --from=source /src /src
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps "/src[serve]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib/python3*/site-packages/tlserve

# ---------------------------------------------------------------- trainer (optional): torch for cluster jobs
FROM python:3.11.14-slim-bookworm AS trainer
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp TMPDIR=/tmp TORCH_HOME=/cache/torch MPLCONFIGDIR=/tmp/matplotlib
# Dependencies first (torch, torchvision, onnx, the CPU onnxruntime), then the sources (see cpu-build).
COPY --from=requirements /deps/train.txt /deps/requirements.txt
RUN pip install --no-cache-dir -r /deps/requirements.txt \
 && rm -rf /deps \
 && useradd --system --uid 10001 --gid 0 --home-dir /tmp --shell /usr/sbin/nologin tlserve
COPY --from=source /src /src
RUN pip install --no-cache-dir --no-deps "/src[train]" \
 && pip check \
 && rm -rf /src
USER 10001
WORKDIR /work
# Training has no server to probe; the job's exit status is its health.
HEALTHCHECK NONE
ENTRYPOINT ["tlserve"]
CMD ["train", "--help"]

# ---------------------------------------------------------------- gpu serving image
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ARG MODEL_REPOSITORY=deploy/docker/models
ENV DEBIAN_FRONTEND=noninteractive
# Accepted hadolint DL3008: see gpu-build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --gid 0 --home-dir /tmp --shell /usr/sbin/nologin tlserve
COPY --from=gpu-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/tlserve/healthcheck.py
COPY ${MODEL_REPOSITORY} /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp TMPDIR=/tmp \
    TLSERVE_REPOSITORY=/models TLSERVE_DEVICE=cuda TLSERVE_PORT=50051 TLSERVE_METRICS_PORT=8080
USER 10001
EXPOSE 50051 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/tlserve/healthcheck.py"]
ENTRYPOINT ["tlserve", "serve"]

# ---------------------------------------------------------------- cpu serving image (default target)
FROM python:3.11.14-slim-bookworm AS cpu
ARG MODEL_REPOSITORY=deploy/docker/models
RUN useradd --system --uid 10001 --gid 0 --home-dir /tmp --shell /usr/sbin/nologin tlserve
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/tlserve/healthcheck.py
COPY ${MODEL_REPOSITORY} /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp TMPDIR=/tmp \
    TLSERVE_REPOSITORY=/models TLSERVE_DEVICE=cpu TLSERVE_PORT=50051 TLSERVE_METRICS_PORT=8080
USER 10001
EXPOSE 50051 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/tlserve/healthcheck.py"]
ENTRYPOINT ["tlserve", "serve"]
