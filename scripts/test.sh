#!/usr/bin/env bash
# The test command: sets up what it needs on first use (scripts/setup.sh), then runs the whole pytest suite once on
# each ComfyUI host set up, newest first: 0.33.0 (where ../shared/hosts has it) and 0.3.75 (always). $WANLEAN_HOST
# (a version) picks one. Extra arguments go to pytest (e.g. `-m slow` for the opt-in heavy runs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/setup-browser.sh" >/dev/null   # Chromium + Playwright for tests/test_frontend.py
bash "$root/scripts/setup-audio.sh"                # espeak-ng for the real-speech tests
cd "$root"
hosts="${WANLEAN_HOST:-$(.venv/bin/python scripts/comfy_host.py hosts)}"
case " $hosts " in
  *" 0.33.0 "*) ;;
  *) echo "ComfyUI 0.33.0 is not set up (../shared/hosts is absent): testing on ComfyUI $hosts only" ;;
esac
rc=0
for v in $hosts; do
  py="$(.venv/bin/python scripts/comfy_host.py python "$v")"
  echo "=== tests on ComfyUI $v ==="
  WANLEAN_HOST="$v" "$py" -m pytest -q "$@" || rc=$?
done
exit $rc
