#!/usr/bin/env bash
# Wheels of what a GPU machine without network access lacks (assumed there: torch,
# transformers, numpy, httpx, prometheus-client, pytest, hypothesis): run on a machine where pip
# reaches the package index, then copy .whl/ (git-ignored) to the GPU machine's checkout;
# scripts/gpu_check.sh installs them from there.
# Versions: those this project is tested with. Python 3.12, x86-64, as on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  pyzmq==27.3.0 setproctitle==1.3.8 \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  opentelemetry-api==1.45.2 gguf==0.19.0
du -sh .whl
