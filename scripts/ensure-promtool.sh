#!/usr/bin/env bash
# Make sure promtool is installed: tests/service/test_grafana_dashboard.py checks
# contrib/prometheus/alerts.yml and every query of the Grafana dashboard with `promtool check
# rules`. Does nothing, quietly, when it is there; otherwise installs Debian's "prometheus"
# package without recommends (with sudo when not root). No Prometheus server needs to run.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-promtool prometheus

echo "ensure-promtool: installing prometheus (for promtool) from Debian's packages"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends prometheus >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus >/dev/null
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "ensure-promtool: the prometheus package installed no promtool" >&2
  exit 1
fi
echo "ensure-promtool: $(promtool --version 2>&1 | head -n 1)"
