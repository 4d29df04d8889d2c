#!/usr/bin/env bash
# Test set-up for the web page's end-to-end test (tests/serve/test_web.py): Debian's headless
# Chromium plus Playwright for Python, which drives it through executable_path=/usr/bin/chromium
# (never `playwright install`: no browser builds are downloaded). Safe to re-run.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
python3 -c "import playwright" 2>/dev/null || python3 -m pip install --quiet "playwright>=1.40"
chromium --version
