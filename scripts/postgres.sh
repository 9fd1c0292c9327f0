#!/usr/bin/env bash
# Install, start and stop a real PostgreSQL server on loopback for the sink tests and
# benchmarks.
#
#   scripts/postgres.sh install   install the Debian package (once per machine)
#   scripts/postgres.sh start     create the cluster (first time) and start it; waits until ready
#   scripts/postgres.sh stop      stop it (data stays, so start resumes it)
#   scripts/postgres.sh reset     stop and delete the data
#   scripts/postgres.sh status    exit 0 when it is up
#   scripts/postgres.sh url       print the connection string
#
# Environment:
#   SLUICE_PG_DIR   data and log dir       (default /tmp/sluice-pg)
#   SLUICE_PG_PORT  port on 127.0.0.1      (default 5433, away from a system server on 5432)
# The server accepts user `sluice`, password `sluice-secret`, database `sluice` (password
# authentication over TCP only), with or without TLS: its certificate (for 127.0.0.1) is
# signed by the test CA in $SLUICE_PG_DIR/tls/ca.pem (`sslmode=require` + that CA).
set -euo pipefail

DIR="${SLUICE_PG_DIR:-/tmp/sluice-pg}"
PORT="${SLUICE_PG_PORT:-5433}"
URL="postgres://sluice:sluice-secret@127.0.0.1:$PORT/sluice"

log() { echo "[postgres] $*" >&2; }

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n "$d" && -x "$d/pg_ctl" ]] && echo "$d"
}

as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install() {
  if bindir >/dev/null; then return 0; fi
  log "installing PostgreSQL from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  bindir >/dev/null || { log "pg_ctl not found after install"; exit 1; }
}

status() { as_pg "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$PORT"; }

# A CA and a server certificate for 127.0.0.1, made once per data directory.
write_tls() {
  local t="$DIR/tls"
  "$(dirname "$0")/test-ca.sh" "$t" server "sluice test PostgreSQL CA"
  if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$t/server.key" "$t/server.pem"; fi
}

ssl_on() {
  [[ "$(as_pg "$(bindir)/psql" -q -h "$DIR" -p "$PORT" -U sluice -d postgres -tAc 'SHOW ssl' 2>/dev/null)" == on ]]
}

start() {
  install
  local bin; bin=$(bindir)
  if status 2>/dev/null; then
    if ssl_on; then return 0; fi
    log "running without TLS (started by an older script); restarting it with TLS"
    stop
  fi
  if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
    log "creating a cluster in $DIR/data"
    mkdir -p "$DIR"
    if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$DIR"; fi
    local pw; pw=$(mktemp); echo "sluice-secret" > "$pw"
    if [[ $(id -u) -eq 0 ]]; then chown postgres "$pw"; fi
    as_pg "$bin/initdb" -D "$DIR/data" -U sluice --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pw"
    cat >> "$DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
fsync = on
max_connections = 200
CONF
  fi
  write_tls
  as_pg "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-c ssl=on -c ssl_cert_file=$DIR/tls/server.pem -c ssl_key_file=$DIR/tls/server.key" start >/dev/null
  if ! as_pg "$bin/psql" -q -h "$DIR" -p "$PORT" -U sluice -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='sluice'" | grep -q 1; then
    as_pg "$bin/psql" -q -h "$DIR" -p "$PORT" -U sluice -d postgres -c "CREATE DATABASE sluice" >/dev/null
  fi
  log "up on 127.0.0.1:$PORT ($URL; TLS with sslmode=require, CA $DIR/tls/ca.pem)"
}

stop() {
  local bin; bin=$(bindir) || return 0
  if [[ -f "$DIR/data/postmaster.pid" ]]; then
    as_pg "$bin/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null || true
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$DIR" ;;
  status) status ;;
  url) echo "$URL" ;;
  *) echo "usage: $0 install|start|stop|reset|status|url" >&2; exit 2 ;;
esac
