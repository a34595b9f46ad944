#!/usr/bin/env bash
# Make sure the commands the docs' runnable blocks use are installed (tests/docs runs every block
# marked "sh runnable"): curl, sqlite3 and jq. Does nothing, quietly, when they are there;
# otherwise installs them from Debian's packages (with sudo when not root).
set -euo pipefail

missing=()
for tool in curl sqlite3 jq; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-doc-tools "${missing[*]}"

echo "ensure-doc-tools: installing ${missing[*]} from Debian's packages"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
for tool in "${missing[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "ensure-doc-tools: $tool still missing" >&2; exit 1; }
done
