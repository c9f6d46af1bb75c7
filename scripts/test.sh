#!/usr/bin/env bash
# The test command: sets up what it needs on first use (scripts/setup.sh), then runs pytest.
# Extra arguments go to pytest (e.g. `-m slow` for the opt-in heavy runs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/setup-browser.sh" >/dev/null   # Chromium + Playwright for tests/test_frontend.py
bash "$root/scripts/setup-audio.sh"                # espeak-ng for the real-speech tests
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
