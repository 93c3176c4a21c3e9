# syntax=docker/dockerfile:1
# Titans MAC inference server. CPU PyTorch by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY titans ./titans
# The project pins torch itself; its other dependencies are ranges from pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install ".[server]"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 titans
COPY --from=build /opt/venv /opt/venv
COPY --chown=titans:titans checkpoints/shakespeare-small /opt/titans/checkpoints/shakespeare-small
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TITANS_HOST=0.0.0.0 \
    TITANS_PORT=8000 \
    TITANS_CHECKPOINT=/opt/titans/checkpoints/shakespeare-small
USER 10001
WORKDIR /home/titans
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"]
CMD ["titans", "serve", "--host", "0.0.0.0"]
