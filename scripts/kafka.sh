#!/usr/bin/env bash
# Install, start and stop a real single-node Apache Kafka (KRaft) broker on loopback.
#
#   scripts/kafka.sh install   fetch the broker jars from Maven Central into the cache
#   scripts/kafka.sh start     format (first time) and start; waits until it accepts connections
#   scripts/kafka.sh stop      stop it (data stays on disk, so start resumes it)
#   scripts/kafka.sh restart   stop + start, keeping the data
#   scripts/kafka.sh reset     stop and delete the data
#   scripts/kafka.sh status    exit 0 when it is up
#   scripts/kafka.sh libs      install, then print the folder of the jars (for java -cp DIR/*)
#
# Environment:
#   SLUICE_KAFKA_VERSION  broker version            (default 4.1.1)
#   SLUICE_CACHE          jar cache, kept across runs (default ~/.cache/sluice)
#   SLUICE_KAFKA_DIR      data, config and log dir    (default /tmp/sluice-kafka)
#   SLUICE_KAFKA_PORT     client port on 127.0.0.1    (default 9092; controller uses port+1;
#                         a SASL_PLAINTEXT listener runs on port+2 with user `sluice`,
#                         password `sluice-secret` for PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512;
#                         a TLS listener on port+4 with a certificate for 127.0.0.1 signed
#                         by the test CA in $SLUICE_KAFKA_DIR/tls/ca.pem; SASL over TLS
#                         (SASL_SSL, same users and certificate) on port+5; a plaintext
#                         listener on port+6 that advertises itself as port+7, where a
#                         test puts a proxy it can cut (an output broker "unreachable"
#                         while the input is not); port+3 is left free: it is the
#                         worker's default metrics port, 9095; a plaintext listener for
#                         the local cluster's pods on port+8 at the cluster bridge's
#                         address, 10.244.0.1, made by `scripts/cluster.sh net`);
#                         a TLS listener that requires a client certificate signed by the
#                         test CA on port+9 ($SLUICE_KAFKA_DIR/tls/client.pem and client.key;
#                         client-encrypted.key is the same key under the password in
#                         client-key.password; stranger.pem/.key are signed by another CA);
#                         for the pods, the same on 10.244.0.1:port+10 (a certificate for
#                         that address) and SASL_PLAINTEXT with the SCRAM users on
#                         10.244.0.1:port+11; SASL_PLAINTEXT with OAUTHBEARER on port+12 for
#                         tokens of the local OpenID Connect server (scripts/oidc.sh, Keycloak:
#                         token endpoint http://127.0.0.1:$SLUICE_OIDC_PORT/realms/sluice/
#                         protocol/openid-connect/token, client `sluice-worker`, secret
#                         `sluice-oidc-secret`, scope `kafka` optional; tokens live 15 s),
#                         checked against its JWKS (signature, issuer, audience `kafka`, expiry
#                         with 1 s of skew, `sub` = the principal, User:sluice-worker); a session
#                         lasts 10 s at most, or until its token expires: a client must then
#                         re-authenticate, and one that did not refresh its token is refused)
#   SLUICE_KAFKA_POD_LISTENER  0 leaves the pods' listener out (default 1 when root)
#   SLUICE_KAFKA_OAUTH    0 leaves the OAUTHBEARER listener out (default 1). With it, `start`
#                         starts the OpenID Connect server first (scripts/oidc.sh start, which
#                         installs Keycloak once per machine: a minute), since the broker exits
#                         at start-up when it cannot fetch the JWKS; and a broker running
#                         without that listener (an older script's, or started with 0) is
#                         restarted with it, keeping its data.
#   SLUICE_OIDC_PORT, SLUICE_OIDC_DIR  the OpenID Connect server's (see scripts/oidc.sh)
#   SLUICE_KAFKA_CPUS     optional taskset cpu list to pin the broker (benchmarks)
set -euo pipefail

VERSION="${SLUICE_KAFKA_VERSION:-4.1.1}"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}/kafka-$VERSION"
DIR="${SLUICE_KAFKA_DIR:-/tmp/sluice-kafka}"
PORT="${SLUICE_KAFKA_PORT:-9092}"
CPORT=$((PORT + 1))
SPORT=$((PORT + 2))
TPORT=$((PORT + 4))
SSPORT=$((PORT + 5))
XPORT=$((PORT + 6))
XADV=$((PORT + 7))
PODPORT=$((PORT + 8))
MPORT=$((PORT + 9))
PODMPORT=$((PORT + 10))
PODSPORT=$((PORT + 11))
OPORT=$((PORT + 12))
POD_ADDR=10.244.0.1
OAUTH="${SLUICE_KAFKA_OAUTH:-1}"
OIDC_ISSUER="http://127.0.0.1:${SLUICE_OIDC_PORT:-9180}/realms/sluice"
OIDC_JWKS="$OIDC_ISSUER/protocol/openid-connect/certs"
OIDC_TOKEN="$OIDC_ISSUER/protocol/openid-connect/token"
# Bumped when the storage format changes (v2: SCRAM users); older data is reformatted.
LAYOUT=2
LOG4J_VERSION=2.24.3
# Kafka 4.1 itself depends on slf4j-api 1.7, which cannot find log4j's SLF4J 2 binding: the
# broker then logged nothing at all ("Defaulting to no-operation (NOP) logger"). SLF4J 2's API
# is compatible with callers built against 1.7.
SLF4J_VERSION=2.0.16
# The jars live in a folder per set (bumped when the set changes), so a new set never
# replaces jars under a broker that is still running from the old one.
JARS_REV=2
LIBS="$CACHE/libs-$JARS_REV"

log() { echo "[kafka] $*" >&2; }

install() {
  if [[ -f "$LIBS/.complete" ]]; then return 0; fi
  command -v java >/dev/null || { log "java not found (need Java 17+)"; exit 1; }
  command -v mvn >/dev/null || { log "mvn not found (need Maven to fetch the broker)"; exit 1; }
  log "fetching Apache Kafka $VERSION from Maven Central into $CACHE (once per machine)"
  mkdir -p "$CACHE"
  cat > "$CACHE/pom-$JARS_REV.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.sluice</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  rm -rf "$LIBS"
  # Maven 3.8 writes colour resets even in batch mode: strip them from what it prints.
  if ! (cd "$CACHE" && mvn -q -B -Dstyle.color=never -f "pom-$JARS_REV.xml" dependency:copy-dependencies -DoutputDirectory="$LIBS" -DincludeScope=runtime) 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g'; then
    log "fetching the broker jars from Maven Central failed"
    exit 1
  fi
  touch "$LIBS/.complete"
  log "installed $(ls "$LIBS" | wc -l) jars"
}

is_up() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

pid() { [[ -f "$DIR/broker.pid" ]] && kill -0 "$(cat "$DIR/broker.pid")" 2>/dev/null && cat "$DIR/broker.pid"; }

# A CA and a broker certificate for 127.0.0.1, made once per data directory; the broker
# reads its key and certificate from one PEM keystore.
write_tls() {
  local t="$DIR/tls"
  [[ -f "$t/broker-keystore.pem" ]] && return 0
  "$(dirname "$0")/test-ca.sh" "$t" broker "sluice test CA"
  openssl pkcs8 -topk8 -nocrypt -in "$t/broker.key" -out "$t/broker.pk8"
  cat "$t/broker.pk8" "$t/broker.pem" > "$t/broker-keystore.pem"
}

# Certificates signed by the test CA: `NAME` with subject CN, for `SAN` (or none); made once.
sign() {
  local t="$DIR/tls" name="$1" cn="$2" san="${3:-}"
  [[ -f "$t/$name.pem" ]] && return 0
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$t/$name.key" -out "$t/$name.csr" 2>/dev/null
  if [[ -n "$san" ]]; then printf 'subjectAltName=%s\n' "$san" > "$t/$name.ext"; else : > "$t/$name.ext"; fi
  openssl x509 -req -in "$t/$name.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 3650 -extfile "$t/$name.ext" -out "$t/$name.pem" 2>/dev/null
  chmod 600 "$t/$name.key"
}

# What the client-certificate listeners need: client certificates (one signed by the test
# CA, its key also encrypted, one signed by a stranger CA) and, for the pods' listener, a
# broker certificate for the cluster bridge's address. Kept beside the broker's own.
write_client_tls() {
  local t="$DIR/tls"
  sign client sluice-client
  if [[ ! -f "$t/client-encrypted.key" ]]; then
    echo "sluice-key-secret" > "$t/client-key.password"
    openssl pkcs8 -topk8 -v2 aes-256-cbc -in "$t/client.key" -out "$t/client-encrypted.key" \
      -passout "file:$t/client-key.password"
  fi
  if [[ ! -f "$t/stranger.pem" ]]; then
    "$(dirname "$0")/test-ca.sh" "$t/stranger-ca" stranger "stranger CA"
    cp "$t/stranger-ca/stranger.pem" "$t/stranger.pem"; cp "$t/stranger-ca/stranger.key" "$t/stranger.key"
  fi
  sign pods "$POD_ADDR" "IP:$POD_ADDR"
  if [[ ! -f "$t/pods-keystore.pem" ]]; then
    openssl pkcs8 -topk8 -nocrypt -in "$t/pods.key" -out "$t/pods.pk8"
    cat "$t/pods.pk8" "$t/pods.pem" > "$t/pods-keystore.pem"
  fi
}

# The listener pods on the local cluster use (scripts/cluster.sh): on the cluster bridge's
# address, so it is reachable from the pod network and from nowhere off this machine.
pod_listener() {
  [[ "${SLUICE_KAFKA_POD_LISTENER:-1}" == 1 && $(id -u) -eq 0 ]] || return 0
  "$(dirname "$0")/cluster.sh" net >/dev/null 2>&1 9>&- || { log "no cluster bridge: the pods' listener is left out"; return 0; }
  POD_LISTENER=",PODS://$POD_ADDR:$PODPORT,PODSMTLS://$POD_ADDR:$PODMPORT,PODSSASL://$POD_ADDR:$PODSPORT"
}

# The OAUTHBEARER listener: tokens from the local OpenID Connect server (scripts/oidc.sh),
# checked by Kafka's own validator against its JWKS: signature, issuer, audience `kafka`, expiry
# (1 s of clock skew, not the default 30), and a `sub` (the principal). A session lasts at most
# 10 s or until its token expires, whichever is first: the client must then re-authenticate,
# and a token that expired meanwhile is refused and the connection closed.
# The validator class is named on purpose: Kafka 4.1's default (DefaultJwtValidator, built
# without a key resolver) is the client-side ClientJwtValidator, which checks neither the
# signature nor the issuer nor the audience; with it the broker took a forged token.
oauth_listener() {
  OAUTH_LISTENER="" OAUTH_PROPS=""
  [[ "$OAUTH" == 1 ]] || return 0
  OAUTH_LISTENER=",OAUTH://127.0.0.1:$OPORT"
  # sasl.oauthbearer.* under the listener's prefix alone: Kafka reads the validator class by
  # its plain name, so under the mechanism's prefix too it would be ignored.
  local l=listener.name.oauth m=listener.name.oauth.oauthbearer
  OAUTH_PROPS="$l.sasl.enabled.mechanisms=OAUTHBEARER
$m.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ;
$m.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
$m.connections.max.reauth.ms=10000
$l.sasl.oauthbearer.jwt.validator.class=org.apache.kafka.common.security.oauthbearer.BrokerJwtValidator
$l.sasl.oauthbearer.jwks.endpoint.url=$OIDC_JWKS
$l.sasl.oauthbearer.expected.issuer=$OIDC_ISSUER
$l.sasl.oauthbearer.expected.audience=kafka
$l.sasl.oauthbearer.clock.skew.seconds=1"
}

# Whether the running broker was started with the OAUTHBEARER listener this script would give
# it now (every line of it): server.properties is written just before the broker starts, so it
# is what the broker runs with.
oauth_running() {
  local line
  oauth_listener
  grep -q "^listeners=.*$OAUTH_LISTENER" "$DIR/server.properties" 2>/dev/null || return 1
  while IFS= read -r line; do
    grep -qxF -- "$line" "$DIR/server.properties" || return 1
  done <<<"$OAUTH_PROPS"
}

write_config() {
  mkdir -p "$DIR/data"
  write_tls
  write_client_tls
  POD_LISTENER=""
  pod_listener
  oauth_listener
  cat > "$DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT,SASL_PLAINTEXT://127.0.0.1:$SPORT,SSL://127.0.0.1:$TPORT,SASL_SSL://127.0.0.1:$SSPORT,PROXIED://127.0.0.1:$XPORT,MTLS://127.0.0.1:$MPORT$OAUTH_LISTENER$POD_LISTENER
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,SASL_PLAINTEXT://127.0.0.1:$SPORT,SSL://127.0.0.1:$TPORT,SASL_SSL://127.0.0.1:$SSPORT,PROXIED://127.0.0.1:$XADV,MTLS://127.0.0.1:$MPORT$OAUTH_LISTENER$POD_LISTENER
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL,PROXIED:PLAINTEXT,PODS:PLAINTEXT,MTLS:SSL,PODSMTLS:SSL,PODSSASL:SASL_PLAINTEXT,OAUTH:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
$OAUTH_PROPS
$(for l in mtls podsmtls; do cat <<MTLS
listener.name.$l.ssl.client.auth=required
listener.name.$l.ssl.truststore.type=PEM
listener.name.$l.ssl.truststore.location=$DIR/tls/ca.pem
MTLS
done)
listener.name.podsmtls.ssl.keystore.type=PEM
listener.name.podsmtls.ssl.keystore.location=$DIR/tls/pods-keystore.pem
$(for l in sasl_plaintext sasl_ssl podssasl; do cat <<JAAS
listener.name.$l.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="admin-secret" user_admin="admin-secret" user_sluice="sluice-secret";
listener.name.$l.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.$l.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
JAAS
done)
ssl.keystore.type=PEM
ssl.keystore.location=$DIR/tls/broker-keystore.pem
inter.broker.listener.name=PLAINTEXT
log.dirs=$DIR/data
num.partitions=8
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=4
log.segment.bytes=268435456
PROPS
  cat > "$DIR/log4j2.properties" <<L4J
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $DIR/broker.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
L4J
}

java_argv() {
  JAVA=()
  if [[ -n "${SLUICE_KAFKA_CPUS:-}" ]]; then JAVA=(taskset -c "$SLUICE_KAFKA_CPUS"); fi
  JAVA+=(java -Xms512m -Xmx2g -XX:+UseG1GC -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$DIR/log4j2.properties")
  # Kafka 4 fetches OAuth URLs only when this system property lists them.
  if [[ "$OAUTH" == 1 ]]; then JAVA+=(-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls="$OIDC_JWKS,$OIDC_TOKEN"); fi
  JAVA+=(-cp "$LIBS/*")
}

start() {
  install
  # The OAUTHBEARER listener fetches the JWKS when the broker starts (no JWKS, no broker), and
  # the tests fetch tokens from the same server: it is started first, and kept up when the
  # broker already runs. fd 9 (our lock) is not for the server to keep.
  if [[ "$OAUTH" == 1 ]]; then "$(dirname "$0")/oidc.sh" start 9>&-; fi
  if pid >/dev/null; then
    if [[ "$OAUTH" == 1 ]] && ! oauth_running; then
      # Started by an older script, with SLUICE_KAFKA_OAUTH=0 (`make demo`) or for another
      # OpenID Connect port: the data stays, so a restart costs only the broker's start-up.
      log "the running broker (pid $(pid)) was not started with this script's OAUTHBEARER listener (port $OPORT, issuer $OIDC_ISSUER); restarting it with it"
      stop
    else
      log "already running (pid $(pid)) on 127.0.0.1:$PORT"; return 0
    fi
  fi
  if is_up; then log "port $PORT is taken by another process; set SLUICE_KAFKA_PORT"; exit 1; fi
  write_config
  if [[ -f "$DIR/data/meta.properties" && "$(cat "$DIR/layout" 2>/dev/null)" != "$LAYOUT" ]]; then
    log "the data in $DIR predates this script's storage layout (SCRAM users); reformatting"
    rm -rf "$DIR/data"; mkdir -p "$DIR/data"
  fi
  if [[ ! -f "$DIR/data/meta.properties" ]]; then
    local id
    java_argv
    id="$("${JAVA[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    log "formatting storage in $DIR/data (cluster id $id)"
    "${JAVA[@]}" kafka.tools.StorageTool format --standalone -t "$id" -c "$DIR/server.properties" \
      --add-scram 'SCRAM-SHA-256=[name=sluice,password=sluice-secret]' \
      --add-scram 'SCRAM-SHA-512=[name=sluice,password=sluice-secret]' >"$DIR/format.log" 2>&1 \
      || { cat "$DIR/format.log" >&2; exit 1; }
    echo "$LAYOUT" > "$DIR/layout"
  fi
  log "starting Apache Kafka $VERSION on 127.0.0.1:$PORT (logs: $DIR/broker.log)"
  java_argv
  # a simple command in the background: $! is the JVM itself, so stop can signal it
  "${JAVA[@]}" kafka.Kafka "$DIR/server.properties" >"$DIR/stdout.log" 2>&1 </dev/null 9>&- &
  echo $! > "$DIR/broker.pid"
  local deadline=$((SECONDS + 90))
  until is_up; do
    if ! pid >/dev/null; then log "broker exited during start-up:"; tail -30 "$DIR/stdout.log" "$DIR/broker.log" >&2 || true; exit 1; fi
    if (( SECONDS > deadline )); then log "broker did not open port $PORT within 90s"; exit 1; fi
    sleep 0.3
  done
  log "up (pid $(cat "$DIR/broker.pid"))${OAUTH_LISTENER:+; OAUTHBEARER on 127.0.0.1:$OPORT}${POD_LISTENER:+; pods reach it at $POD_ADDR:$PODPORT}"
}

stop() {
  local p
  if p="$(pid)"; then
    log "stopping pid $p"
    kill "$p" 2>/dev/null || true
    local deadline=$((SECONDS + 60)) forced=0
    while kill -0 "$p" 2>/dev/null; do
      if (( SECONDS > deadline && forced == 0 )); then log "no clean stop in 60s, killing"; kill -9 "$p" 2>/dev/null || true; forced=1; fi
      sleep 0.2
    done
  fi
  rm -f "$DIR/broker.pid"
  if is_up; then log "port $PORT is still served by a process this script did not start"; exit 1; fi
}

# One start, stop or restart at a time per data directory: two shells starting the broker
# together would both launch it.
lock() {
  [[ -d "$DIR" || "$1" == start ]] || return 0
  mkdir -p "$DIR"; exec 9>"$DIR/.lock"; flock 9
}

case "${1:-}" in
  install) install ;;
  libs) install; echo "$LIBS" ;;
  start) lock start; start ;;
  stop) lock stop; stop ;;
  restart) lock start; stop; start ;;
  reset) lock stop; stop; rm -rf "$DIR" ;;
  status) is_up ;;
  *) echo "usage: $0 install|start|stop|restart|reset|status" >&2; exit 2 ;;
esac
