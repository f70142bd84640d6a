#!/usr/bin/env bash
# The GPU check (README "GPU check"), for a machine with a CUDA PyTorch (python3), nvcc and no package
# index: installs the project's remaining dependencies from wheels downloaded beforehand by
# `make gpu-wheels` (folder .whl/, ignored by git; torchsort is built here, against this torch, with
# nvcc), checks torchsort's CUDA op, then runs `python -m src.bench.gpu_check` (arguments pass through).
# Without a CUDA device it says so and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.whl}
SITE=${GPU_SITE:-/tmp/gpu-check-site}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu-check: $PY's torch sees no CUDA device on this machine: nothing to check (run it where a GPU is)" >&2
  exit 1
fi
if ! ls "$WHEELS"/*.whl "$WHEELS"/torchsort-*.tar.gz >/dev/null 2>&1; then
  echo "gpu-check: no wheels in $WHEELS/: run \`make gpu-wheels\` where pip reaches a package index, and bring $WHEELS/ along" >&2
  exit 1
fi
start=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Only this GPU's architecture: a faster build than torchsort's default list.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
  "$WHEELS"/torchsort-*.tar.gz
echo "gpu-check: dependencies installed in $(( $(date +%s) - start )) s"
"$PY" -m src.core.devices
exec "$PY" -m src.bench.gpu_check "$@"
