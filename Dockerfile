# syntax=docker/dockerfile:1
#
# recserve images. Two targets:
#
#   docker build -t <registry>/recserve:0.1.0 .                          # default (runtime): converters, router, operator
#   docker build --target triton -t <registry>/recserve:0.1.0-triton .   # Triton + recserve (python models, engine builds)
#
# The Helm chart (helm/recserve) runs the first as image.repository:image.tag (router, operator) and the
# second as triton.image (Triton, the engine-compile Job). `make test` lints this file with hadolint;
# each `hadolint ignore` below says why: DL3013 (pin pip packages) for installing the project itself,
# whose dependencies pyproject.toml pins; DL3008 (pin apt packages) for wget, whose version the base
# image's Debian release (and its security updates) decides.

ARG PYTHON_VERSION=3.11
# The official Triton image the `triton` target builds on (nvcr.io/nvidia/tritonserver:<tag>-py3).
ARG TRITON_TAG=25.01
ARG TORCH_VERSION=2.13.0
# The CPU build of PyTorch: any other wheel pulls several GB of CUDA packages.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------
# build: a virtual environment with recserve and its compress, serve, operator and train extras (train: Ray
# Train and Ray Data, for the chart's training RayCluster, which runs this image)
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
ARG PIP_VERSION=26.3
RUN python -m venv /opt/recserve
ENV PATH=/opt/recserve/bin:$PATH
RUN pip install "pip==${PIP_VERSION}" \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY recserve ./recserve
# hadolint ignore=DL3013
RUN pip install ".[compress,serve,operator,train]" \
 && recserve --help >/dev/null

# ---------------------------------------------------------------------------------------------------
# triton: the official Triton image with recserve installed into the interpreter of Triton's python
# backend (the ensembles' python models import recserve) and TensorRT's Python API for
# `recserve build --target tensorrt` (the engine-compile Job).
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3 AS triton
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
# TensorRT's Python wheel must match the TensorRT inside this Triton image (engines are specific to the
# TensorRT version): see NVIDIA's framework support matrix. Empty: the image's own TRT_VERSION.
ARG TENSORRT_VERSION=""
# tensorrt-cu12 for CUDA 12 images, tensorrt-cu13 for CUDA 13 ones.
ARG TENSORRT_PACKAGE=tensorrt-cu12
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY recserve ./recserve
# recserve build (the engine Job) needs the compress extra and tritonclient's model_config_pb2
# hadolint ignore=DL3013
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && python3 -m pip install ".[compress]" "tritonclient[grpc]==2.73.0" \
 && version="${TENSORRT_VERSION:-${TRT_VERSION:-}}" \
 && if [ -z "$version" ]; then echo "set --build-arg TENSORRT_VERSION to this Triton image's TensorRT version" >&2; exit 1; fi \
 && python3 -m pip install "${TENSORRT_PACKAGE}==${version}" \
 && python3 -c "import recserve, tensorrt; from recserve.converters import build" \
 && rm -rf /src
WORKDIR /
# the image's non-root triton-server user (the chart runs it as 1000:1000 with a read-only root filesystem);
# the entrypoint stays NVIDIA's (it runs its arguments: tritonserver ..., recserve build ...)
USER 1000:1000
ENV HOME=/tmp

# ---------------------------------------------------------------------------------------------------
# runtime (the default target): a slim image running `recserve` as a non-root user. wget is there for
# KubeRay's probes of the Ray head and workers (RayService mode).
FROM python:${PYTHON_VERSION}-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 recserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin recserve
COPY --from=build /opt/recserve /opt/recserve
ENV PATH=/opt/recserve/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["recserve"]
CMD ["--help"]
