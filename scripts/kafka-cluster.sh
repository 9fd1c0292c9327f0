#!/usr/bin/env bash
# A replicated Apache Kafka cluster on loopback: three KRaft nodes (each broker and
# controller) from the same jars as scripts/kafka.sh, with what production topics have:
# replication factor 3 and min.insync.replicas=2 for new topics, the consumer offsets and
# the transaction log. For the fault scenarios that kill brokers (tests/src/replicated.rs).
#
#   scripts/kafka-cluster.sh start          format (first time) and start every node; waits
#                                           until each accepts connections (the testkit then
#                                           waits until all three are in the metadata)
#   scripts/kafka-cluster.sh stop           stop every node (data stays; start resumes)
#   scripts/kafka-cluster.sh reset          stop every node and delete the data
#   scripts/kafka-cluster.sh status         exit 0 when every node is up
#   scripts/kafka-cluster.sh kill N         SIGKILL node N (1-3), as a crash
#   scripts/kafka-cluster.sh stop-node N    stop node N cleanly (SIGTERM: controlled shutdown)
#   scripts/kafka-cluster.sh start-node N   start node N again; waits until it accepts connections
#   scripts/kafka-cluster.sh pid N          print node N's pid (exit 1 when it is down)
#   scripts/kafka-cluster.sh bootstrap      print the bootstrap servers
#
# Environment:
#   SLUICE_KAFKA_CLUSTER_PORT  node N's client port is PORT + 10*(N-1), its controller port
#                              that + 1 (default 9300: 9300, 9310, 9320)
#   SLUICE_KAFKA_CLUSTER_DIR   data, config and logs, one directory per node
#                              (default /tmp/sluice-kafka-cluster)
#   SLUICE_KAFKA_VERSION, SLUICE_CACHE   as scripts/kafka.sh (the jars are shared)
set -euo pipefail

DIR="${SLUICE_KAFKA_CLUSTER_DIR:-/tmp/sluice-kafka-cluster}"
BASE="${SLUICE_KAFKA_CLUSTER_PORT:-9300}"
NODES=(1 2 3)
LAYOUT=1

log() { echo "[kafka-cluster] $*" >&2; }

port() { echo $((BASE + 10 * ($1 - 1))); }
cport() { echo $((BASE + 10 * ($1 - 1) + 1)); }
ndir() { echo "$DIR/node$1"; }

is_up() { (exec 3<>"/dev/tcp/127.0.0.1/$(port "$1")") 2>/dev/null; }

pid() {
  local f
  f="$(ndir "$1")/broker.pid"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"
}

check_node() {
  [[ " ${NODES[*]} " == *" ${1:-} "* ]] || { log "no node ${1:-} (nodes: ${NODES[*]})"; exit 2; }
}

voters() {
  local v="" n
  for n in "${NODES[@]}"; do v+="${v:+,}$n@127.0.0.1:$(cport "$n")"; done
  echo "$v"
}

bootstrap() {
  local b="" n
  for n in "${NODES[@]}"; do b+="${b:+,}127.0.0.1:$(port "$n")"; done
  echo "$b"
}

write_config() {
  local n=$1 d
  d="$(ndir "$n")"
  mkdir -p "$d/data"
  cat > "$d/server.properties" <<PROPS
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$(voters)
listeners=PLAINTEXT://127.0.0.1:$(port "$n"),CONTROLLER://127.0.0.1:$(cport "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(port "$n")
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$d/data
num.partitions=4
default.replication.factor=3
min.insync.replicas=2
auto.create.topics.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
log.retention.hours=4
log.segment.bytes=67108864
PROPS
  cat > "$d/log4j2.properties" <<L4J
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $d/broker.log
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
  local n=$1 libs
  libs="$("$(dirname "$0")/kafka.sh" libs)"  # the jars of scripts/kafka.sh, installed if missing
  JAVA=(java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$(ndir "$n")/log4j2.properties" -cp "$libs/*")
}

format() {
  if [[ -f "$DIR/cluster.id" && "$(cat "$DIR/layout" 2>/dev/null)" == "$LAYOUT" ]]; then
    local n ok=1
    for n in "${NODES[@]}"; do [[ -f "$(ndir "$n")/data/meta.properties" ]] || ok=0; done
    (( ok )) && return 0
  fi
  log "formatting the storage of ${#NODES[@]} nodes in $DIR"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  local id n
  java_argv 1
  write_config 1
  id="$("${JAVA[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
  for n in "${NODES[@]}"; do
    write_config "$n"
    java_argv "$n"
    "${JAVA[@]}" kafka.tools.StorageTool format -t "$id" -c "$(ndir "$n")/server.properties" \
      >"$(ndir "$n")/format.log" 2>&1 || { cat "$(ndir "$n")/format.log" >&2; exit 1; }
  done
  echo "$id" > "$DIR/cluster.id"
  echo "$LAYOUT" > "$DIR/layout"
}

launch() {
  local n=$1 d
  d="$(ndir "$n")"
  if pid "$n" >/dev/null; then return 0; fi
  if is_up "$n"; then log "port $(port "$n") is taken by another process; set SLUICE_KAFKA_CLUSTER_PORT"; exit 1; fi
  write_config "$n"
  java_argv "$n"
  # a simple command in the background: $! is the JVM itself, so kill signals it
  "${JAVA[@]}" kafka.Kafka "$d/server.properties" >"$d/stdout.log" 2>&1 </dev/null &
  echo $! > "$d/broker.pid"
}

await_up() {
  local n=$1 deadline=$((SECONDS + 120))
  until is_up "$n"; do
    if ! pid "$n" >/dev/null; then
      log "node $n exited during start-up:"; tail -n 30 "$(ndir "$n")/stdout.log" "$(ndir "$n")/broker.log" >&2 || true; exit 1
    fi
    if (( SECONDS > deadline )); then log "node $n did not open port $(port "$n") within 120s"; exit 1; fi
    sleep 0.3
  done
}

start() {
  scripts_dir="$(dirname "$0")"
  "$scripts_dir/kafka.sh" install
  format
  local n
  for n in "${NODES[@]}"; do launch "$n"; done
  for n in "${NODES[@]}"; do await_up "$n"; done
  log "up: $(bootstrap) (pids $(for n in "${NODES[@]}"; do printf '%s ' "$(pid "$n")"; done)); logs in $DIR/node*/broker.log"
}

stop_node() {
  local n=$1 p
  if p="$(pid "$n")"; then
    kill "$p" 2>/dev/null || true
    local deadline=$((SECONDS + 60)) forced=0
    while kill -0 "$p" 2>/dev/null; do
      if (( SECONDS > deadline && forced == 0 )); then log "node $n: no clean stop in 60s, killing"; kill -9 "$p" 2>/dev/null || true; forced=1; fi
      sleep 0.2
    done
  fi
  rm -f "$(ndir "$n")/broker.pid"
}

kill_node() {
  local n=$1 p
  if p="$(pid "$n")"; then
    kill -9 "$p" 2>/dev/null || true
    while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
  fi
  rm -f "$(ndir "$n")/broker.pid"
}

stop() {
  local n
  # Together, so no node waits for a controlled shutdown the others cannot grant.
  for n in "${NODES[@]}"; do
    local p
    if p="$(pid "$n")"; then kill "$p" 2>/dev/null || true; fi
  done
  for n in "${NODES[@]}"; do stop_node "$n"; done
}

status() {
  local n
  for n in "${NODES[@]}"; do is_up "$n" || return 1; done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$DIR" ;;
  status) status ;;
  kill) check_node "${2:-}"; kill_node "$2" ;;
  stop-node) check_node "${2:-}"; stop_node "$2" ;;
  start-node) check_node "${2:-}"; launch "$2"; await_up "$2" ;;
  pid) check_node "${2:-}"; pid "$2" ;;
  bootstrap) bootstrap ;;
  *) echo "usage: $0 start|stop|reset|status|kill N|stop-node N|start-node N|pid N|bootstrap" >&2; exit 2 ;;
esac
