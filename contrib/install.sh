#!/bin/sh
# Install matrix-identity-appservice as a service on Debian (or a Debian-based image):
#   - Python 3 and venv from Debian's packages, when missing (apt-get);
#   - the package, from a source tree or a wheel, into a virtual environment in $PREFIX
#     (the console script is $PREFIX/bin/matrix-identity-appservice);
#   - a system user and group, $SERVICE_USER, without a login shell;
#   - $STATE_DIR (owner $SERVICE_USER, 0700) for the SQLite database and the signing key;
#   - unless WRITE_CONFIG=0, $CONFIG_DIR/config.yaml (root:$SERVICE_USER, 0640) from the example
#     config, with the database and the signing key moved to $STATE_DIR. An existing config is
#     left alone.
# Usage, as root:  contrib/install.sh [SOURCE]
#   SOURCE: a source tree (a directory with pyproject.toml) or a .whl file; default: the source
#   tree this script belongs to. Run again to upgrade in place.
# The container image (contrib/container/Containerfile) runs exactly this script, and so does
# the suite, in a fresh Debian root file system (tests/service/test_install_chroot.py).
set -eu

PREFIX=${PREFIX:-/opt/matrix-identity-appservice}
SERVICE_USER=${SERVICE_USER:-matrix-identity-appservice}
CONFIG_DIR=${CONFIG_DIR:-/etc/matrix-identity-appservice}
STATE_DIR=${STATE_DIR:-/var/lib/matrix-identity-appservice}
WRITE_CONFIG=${WRITE_CONFIG:-1}
# An empty PIP_CERT (a container build argument left unset) would make pip fail: drop it.
if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT || true; fi

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a system user and directories)"
SOURCE=${1:-$(cd "$(dirname "$0")/.." && pwd)}
case $SOURCE in
  *.whl) [ -f "$SOURCE" ] || die "no wheel at $SOURCE" ;;
  *) [ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE is neither a .whl nor a source tree" ;;
esac

# 1. Python 3.11+ with venv (Debian bookworm's python3 is 3.11).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "python3 with venv is missing and there is no apt-get"
  say "installing python3 and python3-venv from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null
  rm -rf /var/lib/apt/lists/*
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 is older than 3.11"

# 2. The package, in its own virtual environment.
if [ ! -x "$PREFIX/bin/python" ]; then
  say "creating the virtual environment $PREFIX"
  python3 -m venv "$PREFIX"
fi
if [ -d "$SOURCE" ]; then
  # pip builds in the source tree (build/, *.egg-info): build from a copy so the tree stays as
  # it is (it may be read-only, or a bind mount of a checkout).
  BUILD_DIR=$(mktemp -d)
  trap 'rm -rf "$BUILD_DIR"' EXIT
  (cd "$SOURCE" && tar -c --exclude=./.git --exclude=./.venv --exclude=./.cache \
    --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ .) | tar -x -C "$BUILD_DIR"
  TARGET=$BUILD_DIR
else
  TARGET=$SOURCE
fi
say "installing $SOURCE into $PREFIX"
"$PREFIX/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "$TARGET"
"$PREFIX/bin/matrix-identity-appservice" --help >/dev/null ||
  die "the installed console script does not run"

# 3. The service user.
if ! getent group "$SERVICE_USER" >/dev/null; then
  groupadd --system "$SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
  useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
    --shell /usr/sbin/nologin --comment "matrix-identity-appservice" "$SERVICE_USER"
fi

# 4. Directories: state private to the service; config readable by its group, written by root.
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"

# 5. A config, once.
CONFIG=$CONFIG_DIR/config.yaml
if [ "$WRITE_CONFIG" = 1 ] && [ ! -e "$CONFIG" ]; then
  "$PREFIX/bin/matrix-identity-appservice" generate-config -c "$CONFIG" >/dev/null
  # The config directory is read-only for the service (ProtectSystem=strict): the database
  # and the key go to the state directory. Replace the whole values, whatever the defaults are.
  sed -i \
    -e "s|^\(  url: \)[\"']\{0,1\}sqlite:.*\$|\1\"sqlite:$STATE_DIR/identity.db\"|" \
    -e "s|^\(  signing_key_path: \).*\$|\1\"$STATE_DIR/signing.key\"|" \
    "$CONFIG"
  if ! grep -q "^  url: \"sqlite:$STATE_DIR/identity.db\"\$" "$CONFIG" ||
    ! grep -q "^  signing_key_path: \"$STATE_DIR/signing.key\"\$" "$CONFIG"; then
    rm -f "$CONFIG"  # not left half-made: the next run writes it again
    die "could not point database.url and keys.signing_key_path in $CONFIG at $STATE_DIR"
  fi
  chown "root:$SERVICE_USER" "$CONFIG"
  chmod 0640 "$CONFIG"
  say "wrote $CONFIG (edit it, then start the service)"
fi
say "installed $("$PREFIX/bin/pip" show matrix-identity-appservice 2>/dev/null |
  sed -n 's/^Version: //p') in $PREFIX"
