#!/usr/bin/env bash
# espeak-ng, the speech synthesiser the audio tests use to make a real speech file. Idempotent: a no-op
# once `espeak-ng` is on PATH. Installs the Debian/Ubuntu package with apt-get (as root, or via sudo).
set -euo pipefail
command -v espeak-ng >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "espeak-ng is missing and apt-get is not available: install espeak-ng with your package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "installing espeak-ng needs root (or sudo)" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
command -v espeak-ng >/dev/null 2>&1
