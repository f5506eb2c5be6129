#!/usr/bin/env bash
# The GPU checks of tests/gpu on a one-GPU machine, in one line (about 5-8 minutes):
#   bash scripts/gpu_check.sh [PYTEST ARGS | TEST FILES]
# Runs from the source tree (no install). Wheels under .whl/ (scripts/gpu_wheels.sh, for a
# machine without network access) are installed first into $DPATTN_SITE (default: a new
# temporary folder). The log and the result lines (bench figures) go to $OUT (default: a new
# temporary folder, printed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${DPATTN_SITE:-$(mktemp -d)}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d)}
export OUT=$out  # tests/gpu/gpu_util.py keeps the result lines there
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# Test files in "$@" replace the whole module (pyproject's addopts already has -q).
files=(); for a in "$@"; do [[ $a == tests/* ]] && files+=("$a"); done
[ ${#files[@]} -gt 0 ] || set -- tests/gpu "$@"
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 -m pytest -s -rs -p no:cacheprovider \
  --durations=15 "$@" 2>&1 | grep --line-buffered -v 'it/s]$' | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check: log and results in $out"
exit "$status"
