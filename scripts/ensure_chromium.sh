#!/usr/bin/env bash
# Headless Chromium for the report's browser test (tests/test_report.py). Installs Debian's `chromium` package
# when it is missing and apt-get can run (root, or passwordless sudo); otherwise says so and leaves the test to
# skip with its reason. Never fails the caller.
set -u
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null 2>&1; then
    echo "ensure_chromium: $(command -v "$browser") present"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: no apt-get here; the browser test will skip"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure_chromium: not root and no passwordless sudo; the browser test will skip"
    exit 0
  fi
fi
if $SUDO apt-get install -y -q chromium >/tmp/ensure_chromium.log 2>&1 \
   || { $SUDO apt-get update -q >>/tmp/ensure_chromium.log 2>&1 && $SUDO apt-get install -y -q chromium >>/tmp/ensure_chromium.log 2>&1; }; then
  echo "ensure_chromium: installed $(command -v chromium)"
else
  echo "ensure_chromium: apt-get install chromium failed (see /tmp/ensure_chromium.log); the browser test will skip"
fi
exit 0
