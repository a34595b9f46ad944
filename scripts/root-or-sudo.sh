# Sourced by the ensure-*.sh scripts before they install Debian packages: sets SUDO to "" when
# running as root, else to "sudo"; without either, says so (naming the caller, $1, and what it
# cannot install, $2) and exits.
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "$1: not root and no sudo; cannot install $2" >&2
    exit 1
  fi
fi
