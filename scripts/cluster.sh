#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, for the end-to-end suite and for trying
# sluice locally: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy v1.34 built from Go modules (scripts/k8s.sh install-node, cached), containerd,
# runc and the CNI plugins from Debian (scripts/setup.sh). No registry: images are built
# here as tarballs (scripts/images.sh) and imported into the cluster's containerd.
#
#   scripts/cluster.sh install      build what is missing (binaries, the pause image); no start
#   scripts/cluster.sh up           install, start everything, wait for the Node to be Ready
#   scripts/cluster.sh down         stop everything; leaves no process, mount, bridge or
#                                   iptables rule of the cluster behind (logs kept in $DIR.lastlogs)
#   scripts/cluster.sh status       exit 0 when the Node is Ready; prints what runs
#   scripts/cluster.sh kubeconfig   print the admin kubeconfig's path
#   scripts/cluster.sh load TAR...  import image tarballs (docker-archive) into containerd
#   scripts/cluster.sh net          create the cluster's bridge and its address (idempotent;
#                                   scripts/kafka.sh calls it to give pods a listener)
#
# Network: everything stays on this machine. The pods live on the bridge $BRIDGE
# ($POD_CIDR); the bridge's own address ($GATEWAY) is the node's address, the API server's
# and the Kafka listener pods use (scripts/kafka.sh, port+8). IP forwarding stays off.
# No cluster DNS (no CoreDNS image here): pods reach services by address.
#
# Environment: SLUICE_CLUSTER_DIR (state, default /tmp/sluice-cluster), SLUICE_CLUSTER_PORT
# (API server, default 7443; etcd port+10000/+10001), SLUICE_CACHE (default ~/.cache/sluice).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DIR="${SLUICE_CLUSTER_DIR:-/tmp/sluice-cluster}"
API_PORT="${SLUICE_CLUSTER_PORT:-7443}"
ETCD_CLIENT=$((API_PORT + 10000))
ETCD_PEER=$((API_PORT + 10001))
KCM_PORT=17257
SCHED_PORT=17259
KUBELET_PORT=10350
KUBELET_HEALTHZ=10348
PROXY_METRICS=17249
PROXY_HEALTHZ=17256
NODE=sluice-node
BRIDGE=sluice0
POD_CIDR=10.244.0.0/24
GATEWAY=10.244.0.1
SERVICE_CIDR=10.96.0.0/24
SOCK="$DIR/containerd/containerd.sock"
BIN="$("$HERE/k8s.sh" path)"
IMAGES="${SLUICE_CACHE:-$HOME/.cache/sluice}/images"
PAUSE_IMAGE=sluice.local/pause:3.10
ADMIN_TOKEN=sluice-cluster-admin
T0=$SECONDS

log() { printf '[cluster %3ds] %s\n' $((SECONDS - T0)) "$*" >&2; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }
alive() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
kubectl_() { "$("$HERE/tools.sh" path)/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

need_root() {
  [[ $(id -u) -eq 0 ]] || { log "the local cluster needs root (containerd, bridge, iptables)"; exit 1; }
}

install() {
  local missing=()
  for c in containerd runc iptables; do command -v "$c" >/dev/null || missing+=("$c"); done
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  if ((${#missing[@]})); then log "missing ${missing[*]}: run scripts/setup.sh"; exit 1; fi
  "$HERE/k8s.sh" install-node
  "$HERE/tools.sh" install
  # The pause image (the pod sandbox), from the kubernetes module's own pause.c.
  if [[ ! -f "$IMAGES/pause.tar" ]]; then
    local src root
    src="$(cd "$("$HERE/k8s.sh" path)/../wrapper" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
    root="$(mktemp -d)"
    gcc -Os -static -DVERSION=3.10-sluice -o "$root/pause" "$src"
    strip "$root/pause"
    mkdir -p "$IMAGES"
    python3 "$HERE/mkimage.py" --rootfs "$root" --ref "$PAUSE_IMAGE" --out "$IMAGES/pause.tar" --cmd /pause >/dev/null
    rm -rf "$root"
    log "built the pause image ($IMAGES/pause.tar)"
  fi
}

net() {
  need_root
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr show dev "$BRIDGE" | grep -q "inet $GATEWAY/" || ip addr add "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

start_bg() {  # name, then the command; logs to $DIR/logs/name.log, pid to $DIR/name.pid
  local n=$1; shift
  if alive "$n"; then return 0; fi
  "$@" >"$DIR/logs/$n.log" 2>&1 &
  echo $! > "$DIR/$n.pid"
}

wait_for() {  # name, seconds, command...
  local n=$1 t=$2; shift 2
  local deadline=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$n"; then log "$n exited:"; tail -20 "$DIR/logs/$n.log" >&2; exit 1; fi
    if ((SECONDS > deadline)); then log "$n not ready after ${t}s:"; tail -20 "$DIR/logs/$n.log" >&2; exit 1; fi
    sleep 0.5
  done
}

pki() {
  local p="$DIR/pki"
  [[ -f "$p/ca.crt" ]] && return 0
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=sluice-cluster-ca" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' "$GATEWAY" > apiserver.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    cat > tokens.csv <<CSV
$ADMIN_TOKEN,admin,admin,system:masters
sluice-cluster-kubelet,system:node:$NODE,kubelet,system:nodes
sluice-cluster-kcm,system:kube-controller-manager,kcm
sluice-cluster-scheduler,system:kube-scheduler,scheduler
sluice-cluster-proxy,system:kube-proxy,kube-proxy
CSV
  )
}

write_kubeconfig() {  # file token
  cat > "$DIR/$1" <<KC
apiVersion: v1
kind: Config
clusters: [{name: sluice-local, cluster: {server: "https://$GATEWAY:$API_PORT", certificate-authority: "$DIR/pki/ca.crt"}}]
users: [{name: u, user: {token: $2}}]
contexts: [{name: sluice-local, context: {cluster: sluice-local, user: u, namespace: default}}]
current-context: sluice-local
KC
}

containerd_config() {
  mkdir -p "$DIR/containerd" "$DIR/cni/net.d" "$DIR/cni/ipam"
  cat > "$DIR/containerd/config.toml" <<TOML
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  # No CAP_SYS_RESOURCE on this machine kind: a negative oom_score_adj (pause: -998) fails in
  # runc ("failed to update /proc/self/oom_score_adj: Permission denied"). Clamp it.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
        Root = "$DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
TOML
  cat > "$DIR/cni/net.d/10-sluice.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "sluice",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": { "type": "host-local", "dataDir": "$DIR/cni/ipam",
                "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$GATEWAY" }]], "routes": [{ "dst": "0.0.0.0/0" }] }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
}

kubelet_config() {
  mkdir -p "$DIR/kubelet" "$DIR/pod-logs"
  cat > "$DIR/kubelet/config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $GATEWAY
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
podLogsDir: $DIR/pod-logs
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# No registry can be reached: images cannot be pulled again, so never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
maxPods: 60
# No CAP_SYS_RESOURCE here: the kubelet cannot lower its own oom_score_adj (default -999).
oomScoreAdj: 0
YAML
}

up() {
  need_root
  install
  if status >/dev/null 2>&1; then log "already up (kubeconfig: $DIR/kubeconfig)"; return 0; fi
  # Whatever a killed session left (dead processes, mounts, the bridge, rules, old state):
  # start from nothing rather than from half of a cluster.
  if [[ -d "$DIR" ]]; then log "cleaning up a cluster that is not (fully) running"; down; fi
  mkdir -p "$DIR/logs"
  net
  pki
  write_kubeconfig kubeconfig "$ADMIN_TOKEN"
  write_kubeconfig kubelet.kubeconfig sluice-cluster-kubelet
  write_kubeconfig kcm.kubeconfig sluice-cluster-kcm
  write_kubeconfig scheduler.kubeconfig sluice-cluster-scheduler
  write_kubeconfig proxy.kubeconfig sluice-cluster-proxy
  containerd_config
  kubelet_config

  start_bg containerd containerd --config "$DIR/containerd/config.toml"
  wait_for containerd 30 ctr --address "$SOCK" version
  ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" || ctr_ images import "$IMAGES/pause.tar" >/dev/null

  local p="$DIR/pki"
  start_bg etcd "$BIN/etcd" --name "$NODE" --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "$NODE=http://127.0.0.1:$ETCD_PEER" --log-level warn
  # Bound to the bridge's address: the host's clients and the pods (through the `kubernetes`
  # Service) both reach it there, and it is on no outside interface.
  start_bg apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_CLIENT" \
    --bind-address "$GATEWAY" --advertise-address "$GATEWAY" --secure-port "$API_PORT" \
    --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" --client-ca-file "$p/ca.crt" \
    --token-auth-file "$p/tokens.csv" --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-client-certificate "$p/kubelet-client.crt" --kubelet-client-key "$p/kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$p/sa.pub" \
    --service-account-signing-key-file "$p/sa.key" --service-cluster-ip-range "$SERVICE_CIDR" \
    --enable-priority-and-fairness=false
  wait_for apiserver 120 curl -sf --max-time 2 --cacert "$p/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "https://$GATEWAY:$API_PORT/readyz"
  log "kube-apiserver ready on https://$GATEWAY:$API_PORT"
  start_bg kcm "$BIN/kube-controller-manager" --kubeconfig "$DIR/kcm.kubeconfig" \
    --authentication-kubeconfig "$DIR/kcm.kubeconfig" --authorization-kubeconfig "$DIR/kcm.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --use-service-account-credentials=true --service-account-private-key-file "$p/sa.key" \
    --root-ca-file "$p/ca.crt" --cluster-signing-cert-file "$p/ca.crt" --cluster-signing-key-file "$p/ca.key" \
    --controllers '*,-cloud-node-lifecycle-controller,-node-route-controller,-service-lb-controller' \
    --allocate-node-cidrs=false
  start_bg scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/scheduler.kubeconfig" --authorization-kubeconfig "$DIR/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false
  start_bg kubelet "$BIN/kubelet" --config "$DIR/kubelet/config.yaml" --kubeconfig "$DIR/kubelet.kubeconfig" \
    --root-dir "$DIR/kubelet" --cert-dir "$DIR/kubelet/pki" --hostname-override "$NODE" --node-ip "$GATEWAY" -v 1
  # iptables mode, so ClusterIP Services work. No conntrack binary here: stale UDP entries are
  # not flushed (TCP is unaffected).
  start_bg kube-proxy "$BIN/kube-proxy" --kubeconfig "$DIR/proxy.kubeconfig" --hostname-override "$NODE" \
    --cluster-cidr "$POD_CIDR" --proxy-mode iptables --conntrack-max-per-core 0 \
    --metrics-bind-address "127.0.0.1:$PROXY_METRICS" --healthz-bind-address "127.0.0.1:$PROXY_HEALTHZ"

  local deadline=$((SECONDS + 180))
  until node_ready; do
    alive kubelet || { log "kubelet exited:"; tail -30 "$DIR/logs/kubelet.log" >&2; exit 1; }
    ((SECONDS > deadline)) && { log "node not Ready after 180s"; tail -30 "$DIR/logs/kubelet.log" >&2; exit 1; }
    sleep 1
  done
  # Pods of a namespace can only be created once its default ServiceAccount exists.
  deadline=$((SECONDS + 60))
  until kubectl_ get serviceaccount default -n default >/dev/null 2>&1; do
    ((SECONDS > deadline)) && { log "no default ServiceAccount after 60s"; tail -20 "$DIR/logs/kcm.log" >&2; exit 1; }
    sleep 0.5
  done
  log "node $NODE Ready: kubectl --kubeconfig $DIR/kubeconfig get pods -A"
}

node_ready() {
  [[ "$(kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

status() {
  local n rc=0
  for n in containerd etcd apiserver kcm scheduler kubelet kube-proxy; do
    if alive "$n"; then echo "$n running (pid $(cat "$DIR/$n.pid"))"; else echo "$n not running"; rc=1; fi
  done
  if ((rc == 0)) && node_ready; then echo "node $NODE Ready"; else echo "node $NODE not Ready"; rc=1; fi
  return $rc
}

stop_pid() {  # name: TERM, wait up to 20 s, then KILL
  local f="$DIR/$1.pid" p
  [[ -f $f ]] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p"
    local deadline=$((SECONDS + 20))
    while kill -0 "$p" 2>/dev/null; do
      if ((SECONDS > deadline)); then kill -9 "$p" 2>/dev/null || true; log "$1 did not stop in 20s: SIGKILL"; deadline=$((SECONDS + 3600)); fi
      sleep 0.2
    done
  fi
  rm -f "$f"
}

down() {
  need_root
  [[ -d "$DIR" ]] || { cleanup_net; log "not running"; return 0; }
  # 1. No more scheduling or controllers; then let the kubelet tear the pods down (CNI DEL,
  #    unmounts), bounded.
  stop_pid kcm
  stop_pid scheduler
  if alive apiserver && alive kubelet; then
    timeout 90 "$("$HERE/tools.sh" path)/kubectl" --kubeconfig "$DIR/kubeconfig" delete pods --all -A \
      --grace-period=2 --wait=true >/dev/null 2>&1 || log "pod deletion incomplete"
    local i
    for i in $(seq 1 30); do
      [[ -z "$(ctr_ tasks ls -q 2>/dev/null)" ]] && break
      sleep 1
    done
  fi
  stop_pid kubelet
  stop_pid kube-proxy
  stop_pid apiserver
  stop_pid etcd
  [[ -x "$BIN/kube-proxy" ]] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  # 2. Whatever containerd still runs: kill tasks, delete containers, then its shims.
  local shims t c
  shims=$(for f in "$DIR"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*/init.pid; do
    [[ -f $f ]] && awk '{print $4}' "/proc/$(cat "$f")/stat" 2>/dev/null; done | sort -u || true)
  if alive containerd; then
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 1
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  for p in $shims; do
    if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "containerd-shim.*-address $SOCK"; then kill -9 "$p" 2>/dev/null || true; fi
  done
  # 3. Mounts under $DIR (deepest first), network namespaces of our pods, the bridge, rules.
  { grep -o " $DIR[^ ]*" /proc/mounts || true; } | sed 's/^ //' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  cleanup_net
  rm -rf "$DIR.lastlogs"
  cp -r "$DIR/logs" "$DIR.lastlogs" 2>/dev/null || true
  rm -rf "$DIR"
  log "down (logs kept in $DIR.lastlogs)"
}

cleanup_net() {
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  command -v iptables >/dev/null || return 0
  local t r ch
  # the bridge plugin's NAT rules (commented with the network's name) and its CNI-* chains
  { iptables -t nat -S POSTROUTING 2>/dev/null | grep 'name: \\"sluice\\"' || true; } | sed 's/^-A /-D /' | while read -r r; do eval iptables -t nat "$r" || true; done
  for ch in $(iptables -t nat -S 2>/dev/null | awk '/^-N CNI-/{print $2}'); do
    if iptables -t nat -S "$ch" | grep -q '"sluice"'; then iptables -t nat -F "$ch"; iptables -t nat -X "$ch" || true; fi
  done
  # the portmap plugin's chains
  for t in nat filter; do
    for ch in CNI-HOSTPORT-DNAT CNI-HOSTPORT-SNAT CNI-HOSTPORT-MASQ CNI-HOSTPORT-SETMARK; do
      iptables -t "$t" -S "$ch" >/dev/null 2>&1 || continue
      { iptables -t "$t" -S | grep -- "-j $ch\$" || true; } | sed 's/^-A /-D /' | while read -r r; do eval iptables -t "$t" "$r" || true; done
      iptables -t "$t" -F "$ch" 2>/dev/null; iptables -t "$t" -X "$ch" 2>/dev/null || true
    done
  done
  # the kubelet's own chains (KUBE-FIREWALL, the canaries, the hint)
  iptables -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
  iptables -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
  for tc in filter:KUBE-FIREWALL filter:KUBE-KUBELET-CANARY nat:KUBE-KUBELET-CANARY mangle:KUBE-KUBELET-CANARY mangle:KUBE-IPTABLES-HINT; do
    iptables -t "${tc%%:*}" -F "${tc#*:}" 2>/dev/null && iptables -t "${tc%%:*}" -X "${tc#*:}" 2>/dev/null || true
  done
  # containerd 1.6 puts shim sockets and fifos under /run/containerd
  rmdir /run/containerd/s /run/containerd/fifo /run/containerd/runc/k8s.io /run/containerd/runc /run/containerd 2>/dev/null || true
}

load() {
  alive containerd || { log "the cluster is not up: scripts/cluster.sh up"; exit 1; }
  local f
  for f in "$@"; do
    ctr_ images import "$f" >/dev/null
    log "imported $f"
  done
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) down ;;
  status) status ;;
  kubeconfig) echo "$DIR/kubeconfig" ;;
  load) shift; load "$@" ;;
  net) net ;;
  *) echo "usage: $0 install|up|down|status|kubeconfig|load TAR...|net" >&2; exit 2 ;;
esac
