#!/usr/bin/env bash
# Idempotent setup for the browser test (tests/test_frontend.py): Debian's Chromium at /usr/bin/chromium (plus a
# small CJK font, so the workflows' official Chinese negative prompt renders in screenshots) and Playwright's Python
# package in the repo venv, driving that system browser. Playwright's own browser download (`playwright install`)
# is never used. Needs scripts/setup.sh first (the venv); apt-get needs root or passwordless sudo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "setup-browser: no venv at $root/.venv: run scripts/setup.sh first" >&2; exit 1; }

missing=()
for pkg in chromium fonts-wqy-microhei; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

"$py" -c "import playwright" 2>/dev/null || "$py" -m pip install -q "playwright==1.65.2"

/usr/bin/chromium --version 2>/dev/null
"$py" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
