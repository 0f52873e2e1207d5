#!/usr/bin/env bash
# The CUDA half in one command (issue 19): what a lent GPU machine runs from the repository root, the `device` tool's call carrying ".whl":
#     bash bench/gpu_check.sh              # every part of bench/gpu_check.py within its budget; results under $OUT
#     bash bench/gpu_check.sh --dry-run    # here first, on the CPU: the same command, skipping only what needs CUDA (make gpu-dry-run)
# The GPU image has torch, torchvision, timm and pytest but no fastai or nbdev: `make gpu-wheels` puts them and their pure-Python needs into
# .whl/ (git ignores it) before the call; this script installs them there into /tmp/site when fastai is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import fastai" 2>/dev/null; then
  [ -d .whl ] || { echo "fastai is not installed and there is no .whl/: run 'make gpu-wheels' and carry .whl"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import sys, torch, fastai; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'fastai', fastai.__version__)" || exit 2
exec python3 bench/gpu_check.py "$@"
