#!/usr/bin/env bash
# Install, start and stop a real Confluent-compatible schema registry (Apicurio Registry, in
# memory) on loopback, for the schema-registry tests: Confluent's serializers register schemas
# in it and the worker looks them up by id.
#
#   scripts/registry.sh install   fetch Apicurio Registry from Maven Central and build it once
#                                 (Quarkus augmentation) into the cache
#   scripts/registry.sh start     start it; waits until its Confluent-compatible API answers
#   scripts/registry.sh stop      stop it (storage is in memory: every start begins empty)
#   scripts/registry.sh restart   stop + start (and so empty it)
#   scripts/registry.sh reset     stop and delete its state directory
#   scripts/registry.sh status    exit 0 when it is up (the Confluent-compatible API answers)
#   scripts/registry.sh url       print the Confluent-compatible base URL (what a client's
#                                 schema.registry.url is): http://127.0.0.1:PORT/apis/ccompat/v7
#
# Environment:
#   SLUICE_REGISTRY_VERSION    Apicurio Registry version (io.apicurio:apicurio-registry-app;
#                              default 2.4.2.Final, see below)
#   SLUICE_CACHE               download and build cache, kept across runs (default
#                              ~/.cache/sluice; the build lives in apicurio-registry-<version>/)
#   SLUICE_REGISTRY_DIR        state: pid file, log (default /tmp/sluice-registry)
#   SLUICE_REGISTRY_PORT       HTTP port on 127.0.0.1 (default 9280); it opens no other socket
#   SLUICE_REGISTRY_JAVA_HOME  a JDK to run it with (default: `java` on PATH; 2.4.2 runs on 17)
#
# Why 2.4.2.Final and a build of our own: Maven Central has only the application's classes
# (apicurio-registry-app-*.jar is a plain jar, no Main-Class), not a runnable server, so install
# runs the Quarkus build on it. Newer versions do not resolve from Maven Central: 3.3.3 needs
# Java 21 and its apicurio-registry-schema-util-provider is not served (nor 2.6.13.Final's);
# 3.0.x-3.2.x app jars are not served. 2.4.2.Final resolves with two substitutions, made in the
# build below: org.everit.json.schema 1.14.2 (published on JitPack only) is replaced by the same
# library on Maven Central (com.github.erosb:everit-json-schema), and the Quarkus extension
# apicurio-common-app-components-config-index (its -deployment artifact is not served) by a
# producer of its one bean with an empty list (it only lists the settings that the admin API
# may change at run time; nothing here uses that).
#
# What it serves: the Confluent Schema Registry API at /apis/ccompat/v7 (and /v6), the
# registry's own at /apis/registry/v2, health at /health/ready. Schemas live in an in-memory
# H2 database, so a restart forgets them. Ids in the Confluent API are Apicurio content ids
# (registry.ccompat.legacy-id-mode.enabled=false): the same schema text under two subjects gets
# one id, as with Confluent's registry. Subjects may be deleted (DELETE /subjects/<s>).
# Default compatibility NONE. Starts in 3-7 s, about 200 MB resident (256 MiB heap cap).
set -euo pipefail

VERSION="${SLUICE_REGISTRY_VERSION:-2.4.2.Final}"
CACHE_ROOT="${SLUICE_CACHE:-$HOME/.cache/sluice}"
CACHE="$CACHE_ROOT/apicurio-registry-$VERSION"
DIR="${SLUICE_REGISTRY_DIR:-/tmp/sluice-registry}"
PORT="${SLUICE_REGISTRY_PORT:-9280}"
# The Quarkus version Apicurio $VERSION was built with (its parent POM's quarkus.version).
QUARKUS_VERSION="${SLUICE_REGISTRY_QUARKUS_VERSION:-2.16.4.Final}"
EVERIT_VERSION=1.14.2
# Bumped when the build changes: each build lives in its own folder, so a new build never
# replaces files under a server still running from the old one.
BUILD_REV=1
DIST="$CACHE/dist-$BUILD_REV"
BASE="http://127.0.0.1:$PORT"
CCOMPAT="$BASE/apis/ccompat/v7"
START_TIMEOUT="${SLUICE_REGISTRY_START_TIMEOUT:-120}"

log() { echo "[registry] $*" >&2; }

java_bin() {
  if [[ -n "${SLUICE_REGISTRY_JAVA_HOME:-}" ]]; then echo "$SLUICE_REGISTRY_JAVA_HOME/bin/java"; else command -v java; fi
}

check_java() {
  local j major
  j="$(java_bin)" || { log "java not found (need Java 17)"; exit 1; }
  [[ -x "$j" ]] || { log "no java at $j (SLUICE_REGISTRY_JAVA_HOME)"; exit 1; }
  major="$("$j" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]}')"
  if [[ "${major:-0}" -lt 17 ]]; then log "Java ${major:-?} at $j; this build needs Java 17 or newer"; exit 1; fi
}

# The project Maven builds: Apicurio's application classes as a dependency of an otherwise
# empty Quarkus application, with the substitutions explained at the top.
write_build() {
  local b="$1"
  mkdir -p "$b/src/main/java/dev/sluice/registry"
  cat > "$b/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.sluice</groupId><artifactId>registry</artifactId><version>1</version>
  <properties>
    <maven.compiler.source>17</maven.compiler.source>
    <maven.compiler.target>17</maven.compiler.target>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding>
    <!-- Apicurio's app jar carries no Jandex index: without this its beans are not found. -->
    <quarkus.index-dependency.registry-app.group-id>io.apicurio</quarkus.index-dependency.registry-app.group-id>
    <quarkus.index-dependency.registry-app.artifact-id>apicurio-registry-app</quarkus.index-dependency.registry-app.artifact-id>
  </properties>
  <dependencyManagement>
    <dependencies>
      <dependency><groupId>io.apicurio</groupId><artifactId>apicurio-registry</artifactId><version>$VERSION</version><type>pom</type><scope>import</scope></dependency>
    </dependencies>
  </dependencyManagement>
  <dependencies>
    <dependency>
      <groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId><version>$VERSION</version>
      <exclusions>
        <exclusion><groupId>io.apicurio</groupId><artifactId>apicurio-common-app-components-config-index</artifactId></exclusion>
        <exclusion><groupId>com.github.everit-org.json-schema</groupId><artifactId>org.everit.json.schema</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency><groupId>com.github.erosb</groupId><artifactId>everit-json-schema</artifactId><version>$EVERIT_VERSION</version></dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>io.quarkus</groupId><artifactId>quarkus-maven-plugin</artifactId><version>$QUARKUS_VERSION</version>
        <executions><execution><goals><goal>build</goal></goals></execution></executions>
      </plugin>
    </plugins>
  </build>
</project>
POM
  cat > "$b/src/main/java/dev/sluice/registry/DynamicPropertiesProducer.java" <<'JAVA'
package dev.sluice.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/** Stands in for the config-index extension, whose deployment artifact Maven Central lacks. */
public class DynamicPropertiesProducer {
    @Produces
    @Singleton
    DynamicConfigPropertyList dynamicConfigProperties() {
        return new DynamicConfigPropertyList(List.of());
    }
}
JAVA
}

install() {
  if [[ -f "$DIST/.complete" ]]; then return 0; fi
  check_java
  command -v mvn >/dev/null || { log "mvn not found (need Maven to fetch the registry)"; exit 1; }
  mkdir -p "$CACHE"
  # One install at a time per version.
  exec 7>"$CACHE/.install.lock"
  flock 7
  if [[ -f "$DIST/.complete" ]]; then exec 7>&-; return 0; fi
  local t=$SECONDS tmp="$CACHE/tmp-$$"
  rm -rf "$CACHE"/tmp-*  # what an install that was killed left (none runs: we hold the lock)
  write_build "$tmp"
  log "fetching Apicurio Registry $VERSION from Maven Central and building it into $CACHE (once per machine; log: $CACHE/build.log)"
  # The build runs on the JDK that will run the server; Maven 3.8 writes colour resets even in
  # batch mode, hence -Dstyle.color=never. Apicurio's own application.properties asks for a
  # legacy-jar (%prod.quarkus.package.type): a system property outranks it, a POM property not.
  if ! (cd "$tmp" && JAVA_HOME="$(dirname "$(dirname "$(readlink -f "$(java_bin)")")")" \
      mvn -B -Dstyle.color=never package -DskipTests -Dquarkus.package.type=fast-jar) >"$CACHE/build.log" 2>&1; then
    sed 's/\x1b\[[0-9;]*m//g' "$CACHE/build.log" | grep -E '^\[ERROR\]' | head -20 >&2 || true
    log "building Apicurio Registry failed (log: $CACHE/build.log)"
    exit 1
  fi
  rm -rf "$DIST"
  mv "$tmp/target/quarkus-app" "$DIST"
  rm -rf "$tmp"
  touch "$DIST/.complete"
  exec 7>&-
  log "installed Apicurio Registry $VERSION in $((SECONDS - t))s ($(du -sh "$DIST" | cut -f1))"
}

# Alive, and not a zombie that nobody reaped yet (kill -0 succeeds on those).
alive() { kill -0 "$1" 2>/dev/null && [[ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]]; }

pid() { [[ -f "$DIR/registry.pid" ]] && alive "$(cat "$DIR/registry.pid")" && cat "$DIR/registry.pid"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

# Up means the Confluent-compatible API answers, not just the port: Quarkus opens the port
# only once started, but a foreign server on the port would pass a port check.
ready() { curl -sf --max-time 5 -o /dev/null "$CCOMPAT/subjects"; }

start() {
  install
  check_java
  command -v curl >/dev/null || { log "curl not found"; exit 1; }
  if pid >/dev/null; then
    if ready || wait_ready; then log "already running (pid $(pid)) on 127.0.0.1:$PORT"; return 0; fi
    exit 1
  fi
  if port_open; then log "port $PORT is taken by another process; set SLUICE_REGISTRY_PORT"; exit 1; fi
  log "starting Apicurio Registry $VERSION on 127.0.0.1:$PORT (logs: $DIR/registry.log)"
  local t=$SECONDS
  # A simple command in the background: $! is the JVM itself, so stop can signal it. Run from
  # $DIR (Quarkus's working files); our lock's descriptor is not for the server to keep.
  # The settings: loopback only, a small connection pool on the in-memory database, subjects
  # deletable, Confluent ids = content ids (the default, named so a reader sees it).
  (cd "$DIR" && exec "$(java_bin)" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.io.tmpdir="$DIR/tmp" \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$PORT" \
    -Dquarkus.datasource.jdbc.initial-size=2 -Dquarkus.datasource.jdbc.min-size=2 \
    -Dregistry.rest.artifact.deletion.enabled=true \
    -Dregistry.ccompat.legacy-id-mode.enabled=false \
    -Dregistry.enable-redirects=false \
    -jar "$DIST/quarkus-run.jar") >"$DIR/registry.log" 2>&1 </dev/null 9>&- &
  echo $! > "$DIR/registry.pid"
  wait_ready || exit 1
  log "up (pid $(cat "$DIR/registry.pid")) in $((SECONDS - t))s; Confluent API at $CCOMPAT"
}

# Wait until the Confluent-compatible API answers: 1 when the server exits first or is not up
# at the deadline (its log shown).
wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT))
  until ready; do
    if ! pid >/dev/null; then
      log "the registry exited during start-up; its log ends:"; tail -40 "$DIR/registry.log" >&2 || true
      rm -f "$DIR/registry.pid"; return 1
    fi
    if (( SECONDS > deadline )); then
      log "$CCOMPAT did not answer within ${START_TIMEOUT}s; the log ends:"; tail -40 "$DIR/registry.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

stop() {
  local p
  if p="$(pid)"; then
    log "stopping pid $p"
    kill "$p" 2>/dev/null || true
    local deadline=$((SECONDS + 30)) forced=0
    while alive "$p"; do
      if (( SECONDS > deadline && forced == 0 )); then log "no clean stop in 30s, killing"; kill -9 "$p" 2>/dev/null || true; forced=1; fi
      sleep 0.2
    done
  fi
  rm -f "$DIR/registry.pid"
  if port_open; then log "port $PORT is still served by a process this script did not start"; exit 1; fi
}

# One start, stop or restart at a time per state directory: two shells starting it together
# would both launch it.
lock() {
  [[ -d "$DIR" || "$1" == start ]] || return 0
  mkdir -p "$DIR/tmp"; exec 9>"$DIR/.lock"; flock 9
}

case "${1:-}" in
  install) install ;;
  start) lock start; start ;;
  stop) lock stop; stop ;;
  restart) lock start; stop; start ;;
  reset) lock stop; stop; rm -rf "$DIR" ;;
  status) ready ;;
  url) echo "$CCOMPAT" ;;
  *) echo "usage: $0 install|start|stop|restart|reset|status|url" >&2; exit 2 ;;
esac
