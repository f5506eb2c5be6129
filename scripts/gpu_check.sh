#!/usr/bin/env bash
# The GPU checks of tests/gpu on a one-GPU machine, in one line (about 5-8 minutes):
#   bash scripts/gpu_check.sh        (device tool: carry [".whl"] from scripts/gpu_wheels.sh)
# Installs the carried wheels (no network there), runs from the source tree (no install), and
# keeps the log and the result lines (bench figures) under $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dpattn-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/dpattn-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/dpattn-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# Test files in "$@" replace the whole module (pyproject's addopts already has -q).
files=(); for a in "$@"; do [[ $a == tests/* ]] && files+=("$a"); done
[ ${#files[@]} -gt 0 ] || set -- tests/gpu "$@"
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 -m pytest -s -rs -p no:cacheprovider \
  --durations=15 "$@" 2>&1 | grep --line-buffered -v 'it/s]$' | tee "$out/gpu_check.log"
