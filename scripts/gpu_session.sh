#!/usr/bin/env bash
# The GPU checks through the device tool, whose calls carry at most 64 MiB: the module on the
# tiny checkpoints first, then the real Gemma 3 270M sent in parts (ran so on 2026-11-26, H200).
#   here, once:   bash scripts/gpu_wheels.sh
#                 python scripts/gemma_parts.py pack GGUF CONVERTED_DIR .gg 56   (.gg1-5, .gg_meta)
#   call 1:  STAGE=tiny bash scripts/gpu_session.sh       carry .whl .gg1   (Gemma tests skip)
#   call k:  STAGE=part bash scripts/gpu_session.sh       carry .ggk        (k = 2..4, back to back:
#                                                         the machine keeps /tmp while warm)
#   last:    STAGE=gemma bash scripts/gpu_session.sh      carry .whl .gg5 .gg_meta
# Add `/.gg*/` to .git/info/exclude. Logs and result lines land under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/dpattn-gpu-check}
mkdir -p "$out" /tmp/gemma-parts
for d in .gg[0-9]*; do [ -f "$d/gguf.part" ] && cp "$d/gguf.part" "/tmp/gemma-parts/${d#.}"; done
ls -la /tmp/gemma-parts
case "${STAGE:-tiny}" in
  part) ;;
  tiny) bash scripts/gpu_check.sh "$@" ;;
  gemma)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/dpattn-site .whl/*.whl || exit 1
    # shellcheck disable=SC2046  # the parts, in order
    PYTHONPATH=/tmp/dpattn-site python3 scripts/gemma_parts.py unpack \
      $(ls /tmp/gemma-parts/gg* | sort -V) --meta .gg_meta --out /tmp/gemma-270m || exit 1
    DPATTN_GEMMA_PATH=/tmp/gemma-270m bash scripts/gpu_check.sh \
      tests/gpu/test_gemma_cuda.py tests/gpu/test_bench_cuda.py "$@" ;;
esac
