#!/usr/bin/env bash
# Make sure Debian's Chromium is installed (the browser tests drive it headless from the command
# line: tests/support/browser.py). Does nothing, quietly, when it is already there; otherwise
# installs the "chromium" package (with sudo when not root).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-chromium chromium

echo "ensure-chromium: installing Chromium from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  echo "ensure-chromium: the chromium package installed no chromium binary" >&2
  exit 1
fi
echo "ensure-chromium: $(chromium --version 2>/dev/null || /usr/bin/chromium --version)"
