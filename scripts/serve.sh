#!/usr/bin/env bash
# Run the identity server: creates the venv, installs the package, writes config.yaml from the
# example on first run (SQLite database and signing key beside it) and serves on 127.0.0.1:8090.
# Extra arguments go to `python -m appservice run`, e.g. --listen 127.0.0.1:9000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m appservice run -c "${CONFIG:-config.yaml}" "$@"
