#!/usr/bin/env bash
# The newer ComfyUI host for the tests, when this checkout has ../shared/hosts beside it (the project's machines;
# a user's clone has none and tests on 0.3.75 alone): ComfyUI 0.33.0 unpacked into .host/ComfyUI-0.33.0 and a venv
# of its own, .venv-0.33.0, layered over .venv (a .pth file puts .venv's packages after its own, so torch is not
# installed twice) with that host's own pinned requirements. Idempotent; prints nothing when the host is absent.
# Usage: bash scripts/setup-host.sh   (after scripts/setup.sh)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tarball="$root/../shared/hosts/comfyui-0.33.0.tar.gz"
sha=9790cb63a4ce1795403ba2255d0f631e40d8ed51232d253c020fa40a96fdffb8
host="$root/.host/ComfyUI-0.33.0"
venv="$root/.venv-0.33.0"
[ -f "$tarball" ] || exit 0
if [ ! -f "$host/main.py" ]; then
  echo "$sha  $tarball" | sha256sum -c --quiet -
  tmp="$(mktemp -d)"
  tar -xzf "$tarball" -C "$tmp"
  mkdir -p "$root/.host"
  rm -rf "$host"
  mv "$tmp/ComfyUI" "$host"
  rm -rf "$tmp"
fi
# comfy-angle (optional GLSL nodes) is not on the registry; PyOpenGL serves only those nodes
reqs="$(grep -v -E '^(comfy-angle|PyOpenGL)' "$host/requirements.txt")"
stamp="$venv/.setup-$(printf '%s' "$reqs" | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
base="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' | {
  read -r own; echo "$base" > "$own/_wanlean_base.pth"; }
printf '%s\n' "$reqs" | "$venv/bin/python" -m pip install -q -r /dev/stdin
touch "$stamp"
