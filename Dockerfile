# The archbench service (python -m bench.serve) for a trained run, on CPU.
#   docker build -t archbench-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/results:/app/results" archbench-serve results/<study>/runs/<run id>
# GPU: build FROM a CUDA PyTorch image (e.g. pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime), skip the
# CPU wheel line, and run with --gpus all and the extra argument --device cuda.
FROM python:3.11-slim

WORKDIR /app
# the CPU build of torch first, so that pip does not pull the CUDA one
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY bench bench
COPY models models
RUN pip install --no-cache-dir .

EXPOSE 8000
# inside the container the service must listen beyond loopback for -p to reach it
ENTRYPOINT ["python", "-m", "bench.serve", "--host", "0.0.0.0", "--port", "8000"]
