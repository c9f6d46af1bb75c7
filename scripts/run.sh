#!/usr/bin/env bash
# The main job: a bundled workflow through a real headless ComfyUI, writing an mp4.
# Usage: bash scripts/run.sh [WORKFLOW.json] [run_workflow.py options, e.g. --models ~/ComfyUI/models]
#   --comfyui PATH: run on your own ComfyUI folder instead, with the Python in $PYTHON (default python3), which must
#   have that ComfyUI's requirements; then nothing is installed here.
# Without --comfyui it installs what it needs on first use (scripts/setup.sh) and runs on the newest ComfyUI set up.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
wf="workflows/wan21_t2v_1.3B.json"
if [ $# -gt 0 ] && [[ "$1" == *.json ]]; then wf="$1"; shift; fi
for a in "$@"; do
  if [ "$a" = "--comfyui" ]; then exec "${PYTHON:-python3}" scripts/run_workflow.py "$wf" "$@"; fi
done
bash "$root/scripts/setup.sh"
py="$(.venv/bin/python scripts/comfy_host.py python)"   # $WANLEAN_HOST's, else the newest host's
exec "$py" scripts/run_workflow.py "$wf" "$@"
