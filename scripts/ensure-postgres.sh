#!/usr/bin/env bash
# Make sure the PostgreSQL that the integration tests use is reachable; start the local cluster
# where one is installed (as on the development machines). Fails loudly otherwise: the
# PostgreSQL tests never skip silently.
set -euo pipefail
HOST=${BIRD_TEST_PG_HOST:-127.0.0.1}
PORT=${BIRD_TEST_PG_PORT:-5432}

ready() { pg_isready -q -h "$HOST" -p "$PORT" 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "ensure-postgres: pg_isready not found; install PostgreSQL (apt-get install postgresql)" >&2
  exit 1
fi
if ready; then exit 0; fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "ensure-postgres: starting local cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do ready && exit 0; sleep 1; done
fi
echo "ensure-postgres: no PostgreSQL reachable at $HOST:$PORT; the integration tests need one" >&2
exit 1
