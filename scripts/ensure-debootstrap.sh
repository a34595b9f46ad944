#!/usr/bin/env bash
# Make sure debootstrap is installed: tests/service/ build a fresh Debian root file system with
# it (cached as a tarball under .cache/debootstrap/) to run contrib/install.sh in a chroot and to
# import as the container base image. Does nothing, quietly, when it is there; otherwise
# installs Debian's "debootstrap" package (with sudo when not root).
set -euo pipefail

if command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ]; then
  exit 0
fi

# shellcheck source=scripts/root-or-sudo.sh
. "$(dirname "$0")/root-or-sudo.sh" ensure-debootstrap debootstrap

echo "ensure-debootstrap: installing debootstrap from Debian's packages"
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap \
  >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
if [ ! -x /usr/sbin/debootstrap ]; then
  echo "ensure-debootstrap: the debootstrap package installed no /usr/sbin/debootstrap" >&2
  exit 1
fi
echo "ensure-debootstrap: debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"
