#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 and lets user "postgres" in without a
# password (what the test suite expects). In order: use one that already answers; start an
# installed but stopped local cluster; install PostgreSQL from Debian's packages and start it.
set -euo pipefail

HOST=127.0.0.1
PORT=5432
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

answers() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

wait_ready() {
  for _ in $(seq 1 60); do
    if answers; then return 0; fi
    sleep 0.5
  done
  echo "ensure-postgres: PostgreSQL did not start listening on $HOST:$PORT" >&2
  return 1
}

trust_loopback() {
  # A fresh Debian cluster asks for passwords on TCP; the tests connect as postgres without one.
  local version=$1 hba
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  if [ -f "$hba" ] && ! grep -q "^host all postgres 127.0.0.1/32 trust" "$hba"; then
    $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
  fi
}

start_cluster() {
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "ensure-postgres: starting PostgreSQL $version cluster 'main'"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_ready
  echo "$version"
}

if answers; then
  exit 0
fi

if command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
  start_cluster >/dev/null
  exit 0
fi

echo "ensure-postgres: installing PostgreSQL from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq postgresql >/dev/null
if [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "ensure-postgres: the postgresql package installed no cluster" >&2
  exit 1
fi
version=$(start_cluster)
trust_loopback "$version"
wait_ready
