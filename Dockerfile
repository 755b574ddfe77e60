# lvface for GPU clusters. NGC's PyTorch image carries CUDA, NCCL, apex and DALI; lvface adds
# DeepSpeed (with FusedAdam prebuilt for Hopper) and its own code. Not built in lvface's CI (no GPU,
# no registry there); build and smoke-test:
#   docker build -t lvface .
#   docker run --gpus all --rm lvface python -m pytest -q tests/test_config.py
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=8 \
    NCCL_ASYNC_ERROR_HANDLING=1

WORKDIR /opt/lvface
# DeepSpeed with its FusedAdam (the backbone's optimizer, the only DeepSpeed op ZeRO-1/2 training uses)
# compiled here for Hopper (H100/H200, sm_90), so containers do not JIT-compile it at every start
# (a minute or more per node, and a compiler and ninja at run time). No GPU is needed to build: the
# target comes from TORCH_CUDA_ARCH_LIST. --no-build-isolation builds against the image's own torch.
# Add ";10.0" to the list for Blackwell nodes.
ARG DEEPSPEED_VERSION=0.19.8
ARG TORCH_CUDA_ARCH_LIST="9.0"
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 \
        pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" && \
    python -c "from deepspeed.git_version_info import installed_ops as ops; \
assert ops.get('fused_adam'), f'FusedAdam was not prebuilt: {ops}'; print('prebuilt DeepSpeed ops:', \
[name for name, built in ops.items() if built])"
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
