#!/bin/sh
# Run once by the postgres image on an empty data directory (compose.yaml): a database and a
# user for the identity server, with the same password as Synapse's user.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE USER identity WITH PASSWORD '$POSTGRES_PASSWORD';
CREATE DATABASE identity OWNER identity;
SQL
