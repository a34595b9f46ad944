#!/usr/bin/env bash
# Make sure OpenLDAP's slapd and the ldap-utils (slapadd, ldapsearch) are installed: the ldap
# store tests (tests/support/slapd.py) start their own slapd on 127.0.0.1 with a throw-away
# configuration. Does nothing, quietly, when slapd is already there; otherwise installs Debian's
# "slapd" and "ldap-utils" packages (with sudo when not root) without letting the package start
# or keep running a system-wide slapd.
set -euo pipefail

if [ -x /usr/sbin/slapd ] && [ -x /usr/sbin/slapadd ]; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-slapd slapd

echo "ensure-slapd: installing slapd and ldap-utils from Debian's packages"
# No system directory is configured (the tests bring their own), and while installing, services
# are not started (policy-rc.d answering 101 = "action forbidden"), unless the machine already
# has its own policy, which is then left alone.
echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 755 "$POLICY"
  OWN_POLICY=1
fi
cleanup() {
  if [ "$OWN_POLICY" -eq 1 ]; then
    $SUDO rm -f "$POLICY"
  fi
}
trap cleanup EXIT

if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  slapd ldap-utils >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slapd ldap-utils >/dev/null
fi

# Whatever happened above, no system slapd may stay running: it would hold port 389 and is
# not ours to use.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl stop slapd >/dev/null 2>&1 || true
  $SUDO systemctl disable slapd >/dev/null 2>&1 || true
elif command -v service >/dev/null 2>&1; then
  $SUDO service slapd stop >/dev/null 2>&1 || true
fi
for pidfile in /run/slapd/slapd.pid /var/run/slapd/slapd.pid; do
  if [ -f "$pidfile" ]; then
    $SUDO kill "$(cat "$pidfile")" >/dev/null 2>&1 || true
  fi
done

if [ ! -x /usr/sbin/slapd ] || [ ! -x /usr/sbin/slapadd ]; then
  echo "ensure-slapd: the packages installed no /usr/sbin/slapd or slapadd" >&2
  exit 1
fi
echo "ensure-slapd: $(/usr/sbin/slapd -VV 2>&1 | head -n 1)"
