#!/usr/bin/env bash
# Make sure podman and runc are installed: tests/service/test_container.py builds and runs the
# image of contrib/container/Containerfile. runc, because on this machine podman's default
# runtime (crun 1.8) refuses the hybrid cgroup v1/v2 layout. Does nothing, quietly, when both
# are there; otherwise installs Debian's "podman" and "runc" packages (with sudo when not root).
set -euo pipefail

if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-podman "podman and runc"

echo "ensure-podman: installing podman and runc from Debian's packages"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc \
  >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc >/dev/null
fi
if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
  echo "ensure-podman: the packages installed no podman or runc" >&2
  exit 1
fi
echo "ensure-podman: $(podman --version), $(runc --version | head -n 1)"
