#!/usr/bin/env bash
# The main job: a bundled workflow through a real headless ComfyUI, writing an mp4.
# Usage: bash scripts/run.sh [WORKFLOW.json] [run_workflow.py options, e.g. --models ~/ComfyUI/models]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
wf="workflows/wan21_t2v_1.3B.json"
if [ $# -gt 0 ] && [[ "$1" == *.json ]]; then wf="$1"; shift; fi
exec .venv/bin/python scripts/run_workflow.py "$wf" "$@"
