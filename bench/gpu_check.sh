#!/usr/bin/env bash
# The first GPU run in one command, on a single CUDA machine: sets up what it needs, runs the CUDA-only tests and the
# real-width benchmarks, and writes gpu_check.json + gpu_check.md (a README-ready table) into OUT_DIR.
#   bash bench/gpu_check.sh [OUT_DIR] [gpu_check.py options, e.g. --budget 420 --parts device,1.3b]
# Environment (below): what is missing comes from the package registry: torch 2.11.0 (CUDA build) and the core's
# few needs; sageattention 1.0.6 (Triton kernels, a pure-Python wheel); flash-attn only where the registry has a wheel for this machine (it publishes source only
# today, whose CUDA build takes hours: skipped). A folder .whl/ of wheels, when present, is used instead of the
# registry (for machines without a network). The ComfyUI host tree (native reference) as scripts/setup.sh gets it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="$root/bench/results/gpu-check"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then out="$1"; shift; fi
# Python: the machine's own python3 when it already has torch with CUDA and the core's needs, else a venv
# (.venv-gpu) with them from the registry. Optional kernels go into .venv-gpu/extras (on PYTHONPATH), never into
# the machine's own packages.
need="import torch, einops, safetensors, numpy, psutil, tqdm, PIL, pytest; assert torch.cuda.is_available()"
py="python3"
if ! "$py" -c "$need" 2>/dev/null; then
  [ -x "$root/.venv-gpu/bin/python" ] || python3 -m venv "$root/.venv-gpu"
  py="$root/.venv-gpu/bin/python"
  "$py" -c "$need" 2>/dev/null || "$py" -m pip install -q torch==2.11.0 einops safetensors numpy psutil tqdm pillow pytest
  "$py" -c "$need" || { echo "gpu_check: torch sees no CUDA device here" >&2; exit 1; }
fi
extras="$root/.venv-gpu/extras"
mkdir -p "$extras"
export PYTHONPATH="$extras${PYTHONPATH:+:$PYTHONPATH}"
pip_get() {  # into extras; from .whl/ when it exists (a machine without a network), else from the registry
  if [ -d "$root/.whl" ]; then "$py" -m pip install -q --no-deps --target "$extras" --no-index --find-links "$root/.whl" "$@"
  else "$py" -m pip install -q --no-deps --target "$extras" "$@"; fi
}
"$py" -c "import sageattention" 2>/dev/null || pip_get sageattention==1.0.6 || echo "gpu_check: sageattention not installed"
"$py" -c "import flash_attn" 2>/dev/null || pip_get --only-binary=:all: flash-attn 2>/dev/null \
  || echo "gpu_check: flash-attn has no wheel for this machine on the registry: its test is skipped"
bash scripts/fetch-host.sh "$py"
# The dynamic-vram part runs on the newer host (.host/ComfyUI-0.33.0: scripts/setup-host.sh, or carried here) with
# its comfy-aimdo and comfy-kitchen pins; without them that part records why it was skipped
dyn="$root/.host/ComfyUI-0.33.0"
if [ -f "$dyn/requirements.txt" ]; then
  for pkg in comfy-aimdo comfy-kitchen; do
    pin="$(grep -E "^$pkg==" "$dyn/requirements.txt" || echo "$pkg")"
    "$py" -c "import ${pkg//-/_}" 2>/dev/null || pip_get "$pin" || echo "gpu_check: $pkg not installed"
  done
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py --out "$out" "$@"
