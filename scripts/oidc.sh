#!/usr/bin/env bash
# Install, start and stop a real OpenID Connect server (Keycloak) on loopback: it issues the
# tokens that the test broker's OAUTHBEARER listener (scripts/kafka.sh, port+12) validates.
#
#   scripts/oidc.sh install   fetch Keycloak from Maven Central and build it once (`kc.sh build`)
#                             into the cache
#   scripts/oidc.sh start     start it (importing the realm the first time); waits until the realm
#                             issues tokens
#   scripts/oidc.sh stop      stop it (its database stays on disk, so start resumes it)
#   scripts/oidc.sh restart   stop + start
#   scripts/oidc.sh reset     stop and delete its state
#   scripts/oidc.sh status    exit 0 when it is up (the realm answers)
#   scripts/oidc.sh info      print the values a client needs, one NAME=value a line
#
# Environment:
#   SLUICE_OIDC_VERSION    Keycloak version (org.keycloak:keycloak-quarkus-dist; default 26.7.3)
#   SLUICE_CACHE           download and build cache, kept across runs (default ~/.cache/sluice;
#                          Keycloak lives in keycloak-<version>/)
#   SLUICE_OIDC_DIR        state: database, realm file, log (default /tmp/sluice-oidc)
#   SLUICE_OIDC_PORT       HTTP port on 127.0.0.1 (default 9180); the only other socket is the
#                          embedded H2 database's, on an ephemeral port of 127.0.0.1 (no
#                          clustering: --cache=local)
#   SLUICE_OIDC_JAVA_HOME  a JDK to run it with (default: `java` on PATH, as the broker; Keycloak
#                          26.7 is built for Java 17 and runs on it)
#
# Runs as `kc.sh start --optimized` from the build made at install, with a 384 MiB heap (about
# 450 MB resident). What it serves (the realm is imported at the first start, and again, on a new
# database, whenever this script's realm changes):
#   realm      sluice; issuer http://127.0.0.1:PORT/realms/sluice (fixed by --hostname, however
#              the server is reached)
#   token      http://127.0.0.1:PORT/realms/sluice/protocol/openid-connect/token
#   JWKS       http://127.0.0.1:PORT/realms/sluice/protocol/openid-connect/certs
#   client     `sluice-worker`, secret `sluice-oidc-secret` (confidential; client-credentials
#              grant only, secret in HTTP Basic or in the form); its tokens have sub
#              `sluice-worker` (the service account's fixed id: the broker's principal
#              User:sluice-worker), aud `kafka`, scope `kafka`, and live 15 s, so a test
#              shorter than a minute sees them refreshed
#   scope      `kafka`: a default scope of the client, so asking for it (sasl.oauthbearer.scope)
#              or for no scope gives the same token; any other scope is refused (invalid_scope)
#   admin      `admin` / `sluice-admin-secret` in the master realm (admin console and REST API)
# The realm signs with an RSA key made once per cache (SLUICE_CACHE/oidc-signing-key.pem), so
# its JWKS stays the same across `reset`: a broker that cached the keys keeps validating.
set -euo pipefail

VERSION="${SLUICE_OIDC_VERSION:-26.7.3}"
CACHE_ROOT="${SLUICE_CACHE:-$HOME/.cache/sluice}"
CACHE="$CACHE_ROOT/keycloak-$VERSION"
DIR="${SLUICE_OIDC_DIR:-/tmp/sluice-oidc}"
PORT="${SLUICE_OIDC_PORT:-9180}"
# Bumped when the build options change: each build lives in its own folder, so a new build never
# replaces files under a server still running from the old one.
BUILD_REV=1
DIST="$CACHE/dist-$BUILD_REV"
KEY="$CACHE_ROOT/oidc-signing-key.pem"
BASE="http://127.0.0.1:$PORT"
ISSUER="$BASE/realms/sluice"
TOKEN_URL="$ISSUER/protocol/openid-connect/token"
JWKS_URL="$ISSUER/protocol/openid-connect/certs"
CLIENT_ID=sluice-worker
CLIENT_SECRET=sluice-oidc-secret
# A first start creates the database schema and imports the realm: 16-30 s on this 2-core
# machine (10-12 s later on); several times that while builds run beside it.
START_TIMEOUT="${SLUICE_OIDC_START_TIMEOUT:-240}"

log() { echo "[oidc] $*" >&2; }

# The environment kc.sh runs in: the JVM and options chosen here, whatever the caller's
# environment says (JAVA_OPTS would replace kc.sh's defaults and our heap cap; DEBUG=true
# would open a debugger port). An array, so that `"${KC_ENV[@]}" kc.sh ... &` stays a simple
# command whose $! is kc.sh itself.
kc_env() {
  KC_ENV=(env -u JAVA_OPTS -u JAVA_OPTS_APPEND -u JAVA_ADD_OPENS -u DEBUG -u KC_DEBUG -u PRINT_ENV
    JAVA="$(java_bin)" JAVA_OPTS_KC_HEAP="-Xms64m -Xmx384m")
}

java_bin() {
  if [[ -n "${SLUICE_OIDC_JAVA_HOME:-}" ]]; then echo "$SLUICE_OIDC_JAVA_HOME/bin/java"; else command -v java; fi
}

check_java() {
  local j major
  j="$(java_bin)" || { log "java not found (need Java 17+)"; exit 1; }
  [[ -x "$j" ]] || { log "no java at $j (SLUICE_OIDC_JAVA_HOME)"; exit 1; }
  major="$("$j" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]}')"
  if [[ "${major:-0}" -lt 17 ]]; then log "Java ${major:-?} at $j; Keycloak $VERSION needs Java 17 or newer"; exit 1; fi
}

install() {
  if [[ -f "$DIST/.complete" ]]; then return 0; fi
  check_java
  command -v mvn >/dev/null || { log "mvn not found (need Maven to fetch Keycloak)"; exit 1; }
  command -v unzip >/dev/null || { log "unzip not found (scripts/setup.sh installs it)"; exit 1; }
  mkdir -p "$CACHE"
  # One install at a time per version: the rehearsal's services and this checkout's share it.
  exec 7>"$CACHE/.install.lock"
  flock 7
  if [[ -f "$DIST/.complete" ]]; then exec 7>&-; return 0; fi
  local t=$SECONDS tmp="$CACHE/tmp-$$"
  rm -rf "$CACHE"/tmp-*  # what an install that was killed left (none runs: we hold the lock)
  mkdir -p "$tmp"
  log "fetching Keycloak $VERSION from Maven Central into $CACHE (once per machine)"
  # Maven 3.8 writes colour resets even in batch mode: strip them from what it prints.
  if ! (cd "$tmp" && mvn -q -B -Dstyle.color=never dependency:copy \
      -Dartifact="org.keycloak:keycloak-quarkus-dist:$VERSION:zip" -DoutputDirectory="$tmp") 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g'; then
    log "fetching Keycloak from Maven Central failed"
    exit 1
  fi
  unzip -q "$tmp/keycloak-quarkus-dist-$VERSION.zip" -d "$tmp"
  rm -f "$tmp/keycloak-quarkus-dist-$VERSION.zip"
  # Build-time options, fixed once here so every start can be `start --optimized` (no
  # re-augmentation at start: that alone costs half a minute). The rest is given at start.
  log "building it once for fast starts (kc.sh build; log: $CACHE/build.log)"
  kc_env
  if ! "${KC_ENV[@]}" "$tmp/keycloak-$VERSION/bin/kc.sh" build --db=dev-file >"$CACHE/build.log" 2>&1; then
    tail -30 "$CACHE/build.log" >&2
    log "kc.sh build failed"
    exit 1
  fi
  rm -rf "$DIST"
  mv "$tmp/keycloak-$VERSION" "$DIST"
  rm -rf "$tmp"
  touch "$DIST/.complete"
  exec 7>&-
  log "installed Keycloak $VERSION in $((SECONDS - t))s"
}

# The realm's signing key: one per cache, so the JWKS is the same after a reset.
signing_key() {
  [[ -f "$KEY" && -f "$KEY.crt" ]] && return 0
  mkdir -p "$CACHE_ROOT"
  exec 6>"$CACHE_ROOT/.oidc-key.lock"
  flock 6
  if [[ ! -f "$KEY" || ! -f "$KEY.crt" ]]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$KEY.tmp" 2>/dev/null
    openssl req -new -x509 -key "$KEY.tmp" -subj "/CN=sluice" -days 36500 -out "$KEY.crt.tmp" 2>/dev/null
    mv "$KEY.crt.tmp" "$KEY.crt"
    mv "$KEY.tmp" "$KEY"
  fi
  exec 6>&-
}

pem_body() { grep -v -- '-----' "$1" | tr -d '\n'; }

# The realm Keycloak imports. Its own client scopes replace Keycloak's defaults (profile, email,
# roles, ...): `basic` gives the `sub` claim that librdkafka and the broker require, `kafka` the
# audience the broker expects. No `roles` scope, so no `aud: account` either.
write_realm() {
  signing_key
  cat > "$DIR/realm.json.tmp" <<REALM
{
  "realm": "sluice",
  "enabled": true,
  "accessTokenLifespan": 15,
  "sslRequired": "none",
  "clientScopes": [
    {"name": "basic", "protocol": "openid-connect",
     "attributes": {"include.in.token.scope": "false", "display.on.consent.screen": "false"},
     "protocolMappers": [
       {"name": "sub", "protocol": "openid-connect", "protocolMapper": "oidc-sub-mapper",
        "config": {"access.token.claim": "true", "introspection.token.claim": "true"}}]},
    {"name": "kafka", "protocol": "openid-connect",
     "attributes": {"include.in.token.scope": "true", "display.on.consent.screen": "false"},
     "protocolMappers": [
       {"name": "kafka-audience", "protocol": "openid-connect", "protocolMapper": "oidc-audience-mapper",
        "config": {"included.custom.audience": "kafka", "access.token.claim": "true",
                   "id.token.claim": "false", "introspection.token.claim": "true"}}]}
  ],
  "defaultDefaultClientScopes": ["basic"],
  "clients": [
    {"clientId": "$CLIENT_ID", "enabled": true, "protocol": "openid-connect",
     "publicClient": false, "clientAuthenticatorType": "client-secret", "secret": "$CLIENT_SECRET",
     "serviceAccountsEnabled": true, "standardFlowEnabled": false, "implicitFlowEnabled": false,
     "directAccessGrantsEnabled": false,
     "defaultClientScopes": ["basic", "kafka"], "optionalClientScopes": []}
  ],
  "users": [
    {"id": "$CLIENT_ID", "username": "service-account-$CLIENT_ID", "enabled": true,
     "serviceAccountClientId": "$CLIENT_ID"}
  ],
  "components": {
    "org.keycloak.keys.KeyProvider": [
      {"name": "sluice-rsa", "providerId": "rsa", "subComponents": {},
       "config": {"privateKey": ["$(pem_body "$KEY")"], "certificate": ["$(pem_body "$KEY.crt")"],
                  "priority": ["200"], "active": ["true"], "enabled": ["true"], "algorithm": ["RS256"]}}
    ]
  }
}
REALM
  mv "$DIR/realm.json.tmp" "$DIR/realm.json"
}

# What the database was made from: another Keycloak build or another realm means a new one.
state_key() { echo "$VERSION $BUILD_REV $(sha256sum "$DIR/realm.json" | cut -c1-16)"; }

# Alive, and not a zombie that nobody reaped yet (kill -0 succeeds on those).
alive() { kill -0 "$1" 2>/dev/null && [[ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]]; }

pid() { [[ -f "$DIR/keycloak.pid" ]] && alive "$(cat "$DIR/keycloak.pid")" && cat "$DIR/keycloak.pid"; }

# The JVM under kc.sh (recorded once up), if it still runs from this state directory: stop
# ends it too should kc.sh be gone without it.
jvm_pid() {
  local j
  j="$(cat "$DIR/keycloak-jvm.pid" 2>/dev/null)" && alive "$j" &&
    tr '\0' ' ' <"/proc/$j/cmdline" 2>/dev/null | grep -qF -- "$DIR/home/" && echo "$j"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

ready() { curl -sf --max-time 5 -o /dev/null "$ISSUER/.well-known/openid-configuration"; }

token_ok() {
  curl -sf --max-time 10 -o /dev/null -u "$CLIENT_ID:$CLIENT_SECRET" -d grant_type=client_credentials "$TOKEN_URL"
}

start() {
  install
  check_java
  command -v curl >/dev/null || { log "curl not found"; exit 1; }
  mkdir -p "$DIR"
  # One start at a time per state directory (kafka.sh start calls this from several shells).
  exec 8>"$DIR/.start.lock"
  flock 8
  write_realm
  if pid >/dev/null; then
    if [[ "$(cat "$DIR/state" 2>/dev/null)" == "$(state_key)" ]]; then
      if ready || wait_ready; then log "already running (pid $(pid)) on 127.0.0.1:$PORT"; return 0; fi
    else
      log "running with an older realm or build than this script's; restarting it"
      stop
    fi
  fi
  if jvm_pid >/dev/null; then log "its JVM runs without kc.sh; stopping it"; stop; fi
  if port_open; then log "port $PORT is taken by another process; set SLUICE_OIDC_PORT"; exit 1; fi
  if [[ "$(cat "$DIR/state" 2>/dev/null)" != "$(state_key)" ]]; then
    [[ -d "$DIR/home/data" ]] && log "the database in $DIR predates this script's realm or Keycloak build; starting a new one"
    rm -rf "$DIR/home" "$DIR/state"
  fi
  local had_db=""
  [[ -d "$DIR/home/data/h2" ]] && had_db=1
  if launch; then return 0; fi
  if [[ -n "$had_db" ]]; then
    # A server killed in the middle of a write (the end of a session kills whatever runs) can
    # leave a database it cannot open; the realm is re-imported, and its key is the same.
    log "Keycloak did not start on its existing database; once more with a new one"
    rm -rf "$DIR/home" "$DIR/state"
    if launch; then return 0; fi
  fi
  exit 1
}

# Start Keycloak on $DIR/home and wait until the realm issues tokens. Returns 1 when the server
# exited during start-up (its log shown); exits when it is still not ready at the deadline.
launch() {
  local home="$DIR/home"
  # A home of its own (the database, the realm to import, temporary files live in home/data)
  # over the shared build: kc.sh finds its home from its own path, so it is copied, the rest linked.
  mkdir -p "$home/bin" "$home/data/import"
  cp "$DIST/bin/kc.sh" "$home/bin/kc.sh"
  for d in lib conf providers themes; do ln -sfn "$DIST/$d" "$home/$d"; done
  cp "$DIR/realm.json" "$home/data/import/sluice-realm.json"
  local first=""
  [[ -d "$home/data/h2" ]] || first=" (first start: creating the database and importing the realm)"
  log "starting Keycloak $VERSION on 127.0.0.1:$PORT$first (logs: $DIR/keycloak.log)"
  local t=$SECONDS
  # kc.sh runs the JVM as its child and passes TERM on to it; stop signals kc.sh. The lock's
  # descriptors (ours, kafka.sh's, a caller's) are closed in it, or it would hold them for its lifetime.
  kc_env
  "${KC_ENV[@]}" KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD=sluice-admin-secret \
    "$home/bin/kc.sh" start --optimized --import-realm \
      --http-enabled=true --http-host=127.0.0.1 --http-port="$PORT" --hostname="$BASE" \
      --cache=local --log-level=info \
      >"$DIR/keycloak.log" 2>&1 </dev/null 3>&- 4>&- 5>&- 6>&- 7>&- 8>&- 9>&- &
  echo $! > "$DIR/keycloak.pid"
  state_key > "$DIR/state"
  wait_ready || return 1
  pgrep -P "$(cat "$DIR/keycloak.pid")" java >"$DIR/keycloak-jvm.pid" || true
  if ! token_ok; then
    log "the realm answers but issues no token to $CLIENT_ID:"; tail -30 "$DIR/keycloak.log" >&2 || true; exit 1
  fi
  log "up (pid $(cat "$DIR/keycloak.pid")) in $((SECONDS - t))s; issuer $ISSUER, client $CLIENT_ID"
}

# Wait until the realm answers: 1 when the server exits first, exit at the deadline.
wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT))
  until ready; do
    if ! pid >/dev/null; then
      log "Keycloak exited during start-up; its log ends:"; tail -40 "$DIR/keycloak.log" >&2 || true
      rm -f "$DIR/keycloak.pid"; return 1
    fi
    if (( SECONDS > deadline )); then
      log "realm sluice did not answer on 127.0.0.1:$PORT within ${START_TIMEOUT}s; the log ends:"
      tail -40 "$DIR/keycloak.log" >&2 || true; exit 1
    fi
    sleep 0.5
  done
}

stop() {
  local p j
  p="$(pid)" || p=""
  j="$(jvm_pid)" || j=""
  if [[ -n "$p$j" ]]; then
    log "stopping pid ${p:-$j}"
    # kc.sh passes TERM on to the JVM; a JVM whose kc.sh is gone gets it directly
    if [[ -n "$p" ]]; then kill "$p" 2>/dev/null || true; else kill "$j" 2>/dev/null || true; fi
    local deadline=$((SECONDS + 60)) forced=0
    while { [[ -n "$p" ]] && alive "$p"; } || { [[ -n "$j" ]] && alive "$j"; }; do
      if (( SECONDS > deadline && forced == 0 )); then
        log "no clean stop in 60s, killing"
        kill -9 $j $p 2>/dev/null || true
        forced=1
      fi
      sleep 0.2
    done
  fi
  rm -f "$DIR/keycloak.pid" "$DIR/keycloak-jvm.pid"
  if port_open; then
    # the JVM may outlive kc.sh by a moment
    local deadline=$((SECONDS + 10))
    while port_open && (( SECONDS < deadline )); do sleep 0.2; done
    if port_open; then log "port $PORT is still served by a process this script did not start"; exit 1; fi
  fi
}

info() {
  cat <<INFO
SLUICE_OIDC_ISSUER=$ISSUER
SLUICE_OIDC_TOKEN_URL=$TOKEN_URL
SLUICE_OIDC_JWKS_URL=$JWKS_URL
SLUICE_OIDC_CLIENT_ID=$CLIENT_ID
SLUICE_OIDC_CLIENT_SECRET=$CLIENT_SECRET
SLUICE_OIDC_SCOPE=kafka
SLUICE_OIDC_AUDIENCE=kafka
SLUICE_OIDC_TOKEN_LIFETIME_S=15
INFO
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  reset) stop; rm -rf "$DIR" ;;
  status) ready ;;
  info) info ;;
  *) echo "usage: $0 install|start|stop|restart|reset|status|info" >&2; exit 2 ;;
esac
