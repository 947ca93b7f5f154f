# syntax=docker/dockerfile:1
# The archbench service (python -m bench.serve) for a trained run, on CPU.
#   docker build -t archbench-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/results:/app/results:ro" archbench-serve results/<study>/runs/<run id>
# The run folder is the argument (CMD); everything before it (ENTRYPOINT) listens on 0.0.0.0:8000.
# Kubernetes manifests for this image: deploy/k8s (kubectl apply -k deploy/k8s).
#
# GPU variant: drop the CPU-wheel line in the builder (pip then installs PyPI's CUDA build of torch, which
# bundles its CUDA libraries; the host needs the NVIDIA driver and container toolkit), run with --gpus all
# and the extra argument --device cuda (in Kubernetes: resources.limits nvidia.com/gpu: 1). Both stages
# must use the same base image: the venv links to its Python.
ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: a venv with the CPU build of torch and the project, nothing else carried over ---------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# the CPU build of torch first, so that pip does not pull the CUDA one (a layer of its own: cached
# across source changes)
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bench bench
COPY models models
# a regular (not editable) install: the venv holds the project, /src stays behind in this stage
RUN pip install . && python -c "import bench.serve, models"

# -- runtime: the slim base, the venv, a non-root user --------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# numeric UID/GID so that Kubernetes' runAsNonRoot can verify the user (deploy/k8s uses the same 10001)
ARG UID=10001
RUN groupadd --system --gid ${UID} archbench \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /home/archbench --create-home \
        --shell /usr/sbin/nologin archbench
COPY --from=builder /opt/venv /opt/venv
# HOME holds archbench's cache (fitted BPE tokenizers: $ARCHBENCH_CACHE, default ~/.cache/archbench);
# with a read-only root filesystem mount something writable there and on /tmp (deploy/k8s does)
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/archbench \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER 10001:10001

EXPOSE 8000
# /health is 200 while the engine runs, 503 once it has stopped (urlopen raises on 503: exit 1);
# the start period covers loading the checkpoint and fitting the run's tokenizer
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# inside the container the service must listen beyond loopback for -p (or a Service) to reach it
# the run folder is the argument; there is no default (without one the service prints its usage, exits 2)
ENTRYPOINT ["python", "-m", "bench.serve", "--host", "0.0.0.0", "--port", "8000"]
