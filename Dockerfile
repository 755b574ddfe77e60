# lvface for GPU clusters. NGC's PyTorch image carries CUDA, NCCL, apex and DALI; lvface adds
# DeepSpeed and its own code. Build and smoke-test:
#   docker build -t lvface .
#   docker run --gpus all --rm lvface python -m pytest -q tests/test_config.py
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=8 \
    NCCL_ASYNC_ERROR_HANDLING=1

WORKDIR /opt/lvface
# Dependencies first (cached layer). torch stays the image's own build: the range in pyproject.toml
# admits it, so pip installs nothing over it. DALI comes from the image when present, else the extra.
COPY pyproject.toml README.md ./
COPY lvface/__init__.py lvface/__init__.py
COPY kernels/__init__.py kernels/__init__.py
RUN python -c "import nvidia.dali" 2>/dev/null && EXTRAS="triton,mpi,export,dev" || EXTRAS="dali,triton,mpi,export,dev"; \
    pip install --no-cache-dir -e ".[${EXTRAS}]"

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import lvface, lvface.kernels"

# Prometheus exporters: metrics.prometheus_port + local rank.
EXPOSE 9400-9407
CMD ["bash"]
