#!/usr/bin/env bash
# Make sure systemd-analyze is installed: tests/service/test_systemd_unit.py checks
# contrib/systemd/ with `systemd-analyze verify` and `systemd-analyze security --offline`. Does
# nothing, quietly, when it is there; otherwise installs Debian's "systemd" package (with sudo
# when not root). No systemd needs to run: both commands only read unit files.
set -euo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-systemd-analyze systemd

echo "ensure-systemd-analyze: installing systemd from Debian's packages"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  systemd >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    systemd >/dev/null
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "ensure-systemd-analyze: the systemd package installed no systemd-analyze" >&2
  exit 1
fi
echo "ensure-systemd-analyze: $(systemd-analyze --version | head -n 1)"
