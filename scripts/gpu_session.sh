#!/usr/bin/env bash
# The GPU checks in stages, for a GPU machine that can neither download the real Gemma 3 270M
# nor receive it in one piece: the checks on the tiny checkpoints first, then the converted
# checkpoint rebuilt from parts (scripts/gemma_parts.py) and the Gemma checks.
#   on a machine with the checkpoint, once:
#       bash scripts/gpu_wheels.sh
#       python scripts/gemma_parts.py pack GGUF CONVERTED_DIR .gg 56    (.gg1 .. .ggN, .gg_meta)
#   on the GPU machine, each stage with the files it names in the repository root:
#       STAGE=tiny  bash scripts/gpu_session.sh     .whl/ and .gg1      (Gemma tests skip)
#       STAGE=part  bash scripts/gpu_session.sh     the next .ggK       (K = 2 .. N-1)
#       STAGE=gemma bash scripts/gpu_session.sh     .whl/, .ggN and .gg_meta
# Every stage adds the .ggK folders it finds to $GEMMA_PARTS_DIR, which must therefore be the
# same folder, kept between the stages (required). The rebuilt checkpoint goes to
# $GEMMA_OUT_DIR (default: a new temporary folder); logs and result lines to $OUT (see
# scripts/gpu_check.sh). Add `/.gg*/` to .git/info/exclude.
set -uo pipefail
cd "$(dirname "$0")/.."
parts=${GEMMA_PARTS_DIR:?set GEMMA_PARTS_DIR to a folder kept between the stages}
mkdir -p "$parts"
for d in .gg[0-9]*; do [ -f "$d/gguf.part" ] && cp "$d/gguf.part" "$parts/${d#.}"; done
ls -la "$parts"
case "${STAGE:-tiny}" in
  part) ;;
  tiny) bash scripts/gpu_check.sh "$@" ;;
  gemma)
    site=${DPATTN_SITE:-$(mktemp -d)}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || exit 1
    gemma=${GEMMA_OUT_DIR:-$(mktemp -d)}
    # shellcheck disable=SC2046  # the parts, in order
    PYTHONPATH=$site python3 scripts/gemma_parts.py unpack \
      $(ls "$parts"/gg* | sort -V) --meta .gg_meta --out "$gemma" || exit 1
    DPATTN_SITE=$site DPATTN_GEMMA_PATH=$gemma bash scripts/gpu_check.sh \
      tests/gpu/test_gemma_cuda.py tests/gpu/test_bench_cuda.py "$@" ;;
  *) echo "STAGE must be tiny, part or gemma" >&2; exit 2 ;;
esac
