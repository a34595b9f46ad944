#!/usr/bin/env bash
# Run the whole test suite: venv with test extras, PostgreSQL on 127.0.0.1:5432 (started or
# installed if needed), Chromium for the page tests and slapd for the LDAP store tests (Debian
# packages), lint, type check, then pytest on SQLite and PostgreSQL, plus the end-to-end tests
# against a real Synapse (installed once into .cache/synapse-venv) and the import tests against a
# real sydent (.cache/sydent-venv). tests/service need
# systemd-analyze, debootstrap, podman (with runc) and promtool (Debian's prometheus package).
# Extra arguments go to pytest, e.g. scripts/test.sh tests/api -k lookup
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
scripts/ensure-postgres.sh
scripts/ensure-chromium.sh
scripts/ensure-slapd.sh
scripts/ensure-systemd-analyze.sh
scripts/ensure-debootstrap.sh
scripts/ensure-podman.sh
scripts/ensure-promtool.sh
scripts/ensure-doc-tools.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
