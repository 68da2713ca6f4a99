#!/usr/bin/env bash
# A real one-node Kubernetes cluster on this machine, for trying Chorus on
# Kubernetes and for the end-to-end suite.
#
#   scripts/cluster.sh up       build what is missing, start the cluster, build
#                               and import the images; last line: export KUBECONFIG=…
#   scripts/cluster.sh images   rebuild the images from the current tree and import them
#   scripts/cluster.sh status   which of the cluster's processes run, the node, the images
#   scripts/cluster.sh down     stop exactly the processes and containers `up` started
#                               (--purge: also forget the cluster's state)
#   scripts/cluster.sh build    only build (or find) the Kubernetes binaries
#
# Everything comes from package registries: Kubernetes, etcd and CoreDNS are
# built from their Go modules (scripts/cluster/build.sh, cached under
# $CHORUS_CACHE, so only the first `up` takes long); containerd, runc and the
# CNI plugins are Debian's; images are OCI archives written by
# scripts/cluster/mkimage.py and imported into containerd (no registry):
#
#   docker.io/library/chorus-server:<version>    the server on a minimal Debian root
#   docker.io/library/chorus-operator:<version>  the operator and the libraries it links
#   docker.io/library/redis:7.0                  redis-server + redis-sentinel 7.0.15 from
#                                                Debian, standing in for Docker Hub's redis:7.0
#   registry.k8s.io/pause:3.10                   the pod sandbox (scripts/cluster/pause.c)
#
# These are the names the chart and the MessagingCluster defaults ask for
# (`chorus-operator:<version>`, `chorus-server:<version>`, `redis:7.0`), so
# the quickstart needs no image settings.
#
# The node's address (10.200.0.1) lives on an interface of its own, pods on
# a bridge (10.244.0.0/24), Services (10.96.0.0/16) through kube-proxy in
# iptables mode and DNS through CoreDNS on the node address: nothing leaves
# the machine. Needs root (re-runs itself with sudo), cgroups mounted
# (v1 or v2) and a kernel with bridge and netfilter support.
#
# Settings (environment): CHORUS_CACHE (default ~/.cache/chorus: binaries,
# root file systems), CHORUS_CLUSTER_DIR (default /var/lib/chorus-cluster:
# certificates, etcd, containerd, kubelet, logs and pid files),
# CHORUS_PROFILE (release or debug: which cargo build the Chorus images take;
# default release).
#
# Storage: the default StorageClass `local` is served by the cluster's own
# provisioner (scripts/cluster/volumes.sh, process "volumes"): a claim gets
# a folder DIR/volumes/<claim uid> that any pod user can write (the Redis
# pods run as uid 65532), deleted with the claim.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

export CHORUS_CACHE=${CHORUS_CACHE:-$HOME/.cache/chorus}
PROFILE=${CHORUS_PROFILE:-release}
K8S_VERSION=${K8S_VERSION:-v1.34.4}
BIN=$CHORUS_CACHE/k8s/$K8S_VERSION/bin
DIR=${CHORUS_CLUSTER_DIR:-/var/lib/chorus-cluster}
PKI=$DIR/pki
LOGS=$DIR/logs
RUN=$DIR/run

NODE=chorus-node
NODE_IP=10.200.0.1
NODE_LINK=chorus0
POD_CIDR=10.244.0.0/24
POD_BRIDGE=chorus-cni0
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
CONTAINERD_SOCK=/run/chorus-containerd/containerd.sock
PAUSE_IMAGE=registry.k8s.io/pause:3.10
REDIS_IMAGE=docker.io/library/redis:7.0
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
SERVER_IMAGE=docker.io/library/chorus-server:$VERSION
OPERATOR_IMAGE=docker.io/library/chorus-operator:$VERSION

# Processes the cluster owns, in start order; `down` stops them in reverse.
PROCESSES="etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns volumes"
# The provisioner of StorageClass `local` (scripts/cluster/volumes.sh).
VOLUME_PROVISIONER=chorus.dev/host-folder

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }
kubectl() { "$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" "$@"; }
ctr() { command ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# wait_for WHAT SECONDS COMMAND…: runs COMMAND every 0.5 s until it succeeds.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "gave up after ${seconds}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

# write_config FILE: stdin to FILE, only when it differs. Running processes
# watch some of these files (kube-proxy exits when its configuration
# changes), so an `up` of a running cluster must leave them untouched.
write_config() {
  local new
  new=$(cat)
  if [ ! -f "$1" ] || [ "$(cat "$1")" != "$new" ]; then
    printf '%s\n' "$new" >"$1"
  fi
}

pid_of() { [ -f "$RUN/$1.pid" ] && cat "$RUN/$1.pid"; }
running() { local pid; pid=$(pid_of "$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

# start NAME COMMAND…: runs COMMAND in the background, logging to $LOGS/NAME.log.
start() {
  local name=$1
  shift
  if running "$name"; then
    log "$name already running (pid $(pid_of "$name"))"
    return
  fi
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

stop() {
  local name=$1 pid
  pid=$(pid_of "$name") || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    if ! wait_for "$name to stop" 20 bash -c "! kill -0 $pid"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
    log "stopped $name"
  fi
  rm -f "$RUN/$name.pid"
}

install_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v setsid >/dev/null || missing+=(util-linux)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

network_up() {
  # The node address on an interface of its own: a dummy interface where
  # the kernel has them, else a bridge with no ports (it only holds the
  # address; traffic to it is local).
  if ! ip link show "$NODE_LINK" >/dev/null 2>&1; then
    ip link add "$NODE_LINK" type dummy 2>/dev/null || ip link add "$NODE_LINK" type bridge
  fi
  ip addr show dev "$NODE_LINK" | grep -q "inet $NODE_IP/" || ip addr add "$NODE_IP/32" dev "$NODE_LINK"
  ip link set "$NODE_LINK" up
  sysctl -qw net.ipv4.ip_forward=1
  # Service traffic between pods on one bridge must pass iptables.
  if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    modprobe br_netfilter 2>/dev/null || die "the kernel lacks br_netfilter (bridge-nf-call-iptables)"
  fi
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  # cgroup v1 machines may lack the hugetlb hierarchy the kubelet expects.
  if [ ! -f /sys/fs/cgroup/cgroup.controllers ] && [ ! -d /sys/fs/cgroup/hugetlb ] \
    && grep -qw hugetlb /proc/cgroups; then
    mkdir -p /sys/fs/cgroup/hugetlb
    mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
  fi
}

pki() {
  mkdir -p "$PKI"
  [ -f "$PKI/ca.crt" ] && return
  log "certificates in $PKI"
  (
    cd "$PKI"
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=chorus-cluster-ca" 2>/dev/null
    # X.509 v3 with key usages: TLS libraries such as rustls refuse v1
    # certificates and ones without the usage they are presented for.
    cert() { # NAME SUBJECT [SUBJECT_ALT_NAMES]
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [ -n "${3:-}" ]; then
          echo "extendedKeyUsage=serverAuth,clientAuth"
          echo "subjectAltName=$3"
        else
          echo "extendedKeyUsage=clientAuth"
        fi
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -out "$1.crt" -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    cert apiserver "/CN=kube-apiserver" \
      "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$API_SERVICE_IP,IP:$NODE_IP,IP:127.0.0.1"
    cert admin "/O=system:masters/CN=chorus-admin"
    cert kubelet "/O=system:nodes/CN=system:node:$NODE"
    cert kube-proxy "/CN=system:kube-proxy"
    cert coredns "/CN=system:coredns"
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

kubeconfig() { # NAME: a kubeconfig for the certificate NAME
  write_config "$DIR/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chorus
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: $PKI/ca.crt}
users:
- name: $1
  user: {client-certificate: $PKI/$1.crt, client-key: $PKI/$1.key}
contexts:
- name: chorus
  context: {cluster: chorus, user: $1, namespace: default}
current-context: chorus
EOF
  chmod 600 "$DIR/$1.kubeconfig"
}

control_plane_up() {
  start etcd "$BIN/etcd" --name "$NODE" --data-dir "$DIR/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NODE=http://127.0.0.1:2380" --unsafe-no-fsync --log-level warn
  wait_for "etcd" 60 curl -sf http://127.0.0.1:2379/health
  start kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 --advertise-address="$NODE_IP" --bind-address="$NODE_IP" \
    --secure-port=6443 --service-cluster-ip-range="$SERVICE_CIDR" \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-preferred-address-types=InternalIP --allow-privileged=true --profiling=false
  wait_for "the API server" 120 kubectl get --raw /readyz
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --bind-address=127.0.0.1 --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --profiling=false
}

# The runc containerd calls. Where this machine refuses to lower an OOM
# score (no CAP_SYS_RESOURCE, as in some VM sandboxes), runc fails on every
# pod sandbox, which the kubelet gives a score of -998: there a wrapper
# raises negative scores to 0 in the bundle's config before runc reads it.
runtime_binary() {
  if bash -c 'echo -1 >/proc/self/oom_score_adj' 2>/dev/null; then
    command -v runc
    return
  fi
  mkdir -p "$DIR/bin"
  write_config "$DIR/bin/runc" <<WRAPPER
#!/bin/sh
# Written by scripts/cluster.sh: negative oomScoreAdj -> 0, then runc.
bundle=
prev=
for arg in "\$@"; do
  [ "\$prev" = --bundle ] && bundle=\$arg
  case "\$arg" in --bundle=*) bundle=\${arg#--bundle=} ;; esac
  prev=\$arg
done
if [ -n "\$bundle" ] && [ -f "\$bundle/config.json" ]; then
  sed -i 's/"oomScoreAdj":-[0-9]*/"oomScoreAdj":0/' "\$bundle/config.json"
fi
exec $(command -v runc) "\$@"
WRAPPER
  chmod 755 "$DIR/bin/runc"
  echo "$DIR/bin/runc"
}

containerd_up() {
  mkdir -p "$DIR/cni/net.d" "$DIR/containerd" /run/chorus-containerd
  local runc
  runc=$(runtime_binary)
  write_config "$DIR/containerd.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "/run/chorus-containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      BinaryName = "$runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
EOF
  write_config "$DIR/cni/net.d/10-chorus.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "chorus-pods", "plugins": [
  {"type": "bridge", "bridge": "$POD_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$DIR/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  start containerd containerd --config "$DIR/containerd.toml"
  wait_for "containerd" 60 ctr version
}

node_up() {
  : >"$DIR/pod-resolv.conf" # pods must not reach this machine's resolver
  write_config "$DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
address: $NODE_IP
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $DIR/pod-resolv.conf
podLogsDir: $DIR/pod-logs
failSwapOn: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
maxPods: 200
EOF
  start kubelet "$BIN/kubelet" --config="$DIR/kubelet.yaml" --kubeconfig="$DIR/kubelet.kubeconfig" \
    --root-dir="$DIR/kubelet" --node-ip="$NODE_IP" --hostname-override="$NODE"
  write_config "$DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0}
EOF
  start kube-proxy "$BIN/kube-proxy" --config="$DIR/kube-proxy.yaml"
  write_config "$DIR/Corefile" <<EOF
.:53 {
  bind $NODE_IP
  errors
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $DIR/coredns.kubeconfig
    pods insecure
    fallthrough in-addr.arpa ip6.arpa
  }
  cache 5
}
EOF
  start coredns "$BIN/coredns" -conf "$DIR/Corefile"
}

# Cluster-wide objects: CoreDNS's read access (the other host processes
# use built-in users), and a default StorageClass whose volumes are folders
# of this machine (made by the "volumes" process, see volumes_up), so
# PersistentVolumeClaims such as Redis storage bind.
bootstrap_objects() {
  # A class's provisioner cannot change: replace one left by an older
  # version of this script (the controller manager's host-path provisioner).
  local provisioner
  provisioner=$(kubectl get storageclass local -o jsonpath='{.provisioner}' 2>/dev/null || true)
  if [ -n "$provisioner" ] && [ "$provisioner" != "$VOLUME_PROVISIONER" ]; then
    kubectl delete storageclass local >/dev/null
  fi
  kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: $VOLUME_PROVISIONER
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "chorus:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "chorus:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "chorus:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "system:coredns"}
EOF
}

# The provisioner of StorageClass `local`: every 2 s it binds Pending
# claims to folders under $DIR/volumes and deletes Released volumes.
volumes_up() {
  start volumes bash "$here/cluster/volumes.sh" "$BIN/kubectl" "$DIR/admin.kubeconfig" \
    "$DIR/volumes" "$NODE"
}

node_ready() {
  kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

dns_ready() {
  # CoreDNS answers for the API server's Service.
  python3 - "$NODE_IP" <<'EOF'
import socket, struct, sys
q = struct.pack(">HHHHHH", 0x4348, 0x0100, 1, 0, 0, 0)
for part in "kubernetes.default.svc.cluster.local".split("."):
    q += bytes([len(part)]) + part.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(q, (sys.argv[1], 53))
reply = s.recv(512)
sys.exit(0 if reply[3] & 0x0F == 0 and struct.unpack(">H", reply[6:8])[0] > 0 else 1)
EOF
}

# --- images ---------------------------------------------------------------

ROOTFS=$CHORUS_CACHE/rootfs
IMAGES=$CHORUS_CACHE/images

# rootfs NAME PACKAGES…: a minimal Debian root with PACKAGES, made once.
rootfs() {
  local name=$1
  shift
  local key dir
  key=$(echo "bookworm $*" | sha256sum | cut -c1-12)
  dir=$ROOTFS/$name-$key
  if [ ! -d "$dir" ]; then
    log "Debian root file system '$name' with: ${*:-nothing extra}"
    rm -rf "$dir.tmp"
    mkdir -p "$ROOTFS"
    local include=()
    [ "$#" -gt 0 ] && include=(--include="$(IFS=,; echo "$*")")
    mmdebstrap --quiet --variant=essential "${include[@]}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      bookworm "$dir.tmp" >&2
    mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# The closure of shared libraries BINARY needs, as --file arguments.
libraries() {
  ldd "$1" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    echo "--file=$(readlink -f "$lib"):$lib"
  done
}

cargo_out() {
  local target=debug
  [ "$PROFILE" = release ] && target=release
  echo "${CARGO_TARGET_DIR:-$repo/target}/$target"
}

build_binaries() {
  local flags=()
  case "$PROFILE" in
    release) flags=(--release) ;;
    debug) ;;
    *) die "CHORUS_PROFILE must be release or debug, not '$PROFILE'" ;;
  esac
  log "building chorus-server and chorus-operator ($PROFILE)"
  (cd "$repo" && cargo build --locked "${flags[@]}" --bin chorus-server --bin chorus-operator)
}

build_images() {
  mkdir -p "$IMAGES"
  local out
  out=$(cargo_out)
  local stage=$IMAGES/stage
  rm -rf "$stage"
  mkdir -p "$stage"
  for b in chorus-server chorus-operator; do
    objcopy --strip-debug "$out/$b" "$stage/$b"
  done

  gcc -Os -static -o "$stage/pause" "$here/cluster/pause.c"
  strip "$stage/pause"
  python3 "$here/cluster/mkimage.py" --name "$PAUSE_IMAGE" --out "$IMAGES/pause.tar" \
    --file "$stage/pause:/pause" --entrypoint /pause --user 65535:65535

  local redis_root base_root
  redis_root=$(rootfs redis redis-server redis-sentinel)
  python3 "$here/cluster/mkimage.py" --name "$REDIS_IMAGE" --out "$IMAGES/redis.tar" \
    --dir "$redis_root" --entrypoint redis-server --workdir /data >&2

  # The server image has a shell and coreutils (the pods' preStop hook runs
  # `sleep`), like the Dockerfile's Debian slim base.
  base_root=$(rootfs base ca-certificates)
  python3 "$here/cluster/mkimage.py" --name "$SERVER_IMAGE" --out "$IMAGES/chorus-server.tar" \
    --dir "$base_root" --file "$stage/chorus-server:/usr/local/bin/chorus-server" \
    --entrypoint /usr/local/bin/chorus-server --env CHORUS_LISTEN=0.0.0.0:8080 --user 65532:65532 >&2

  # The operator image holds the binary and the libraries it links, like
  # the Dockerfile's distroless base.
  mapfile -t libs < <(libraries "$stage/chorus-operator")
  python3 "$here/cluster/mkimage.py" --name "$OPERATOR_IMAGE" --out "$IMAGES/chorus-operator.tar" \
    "${libs[@]}" --file "$stage/chorus-operator:/usr/local/bin/chorus-operator" \
    --entrypoint /usr/local/bin/chorus-operator --cmd run --user 65532:65532 >&2
}

import_images() {
  for t in pause redis chorus-server chorus-operator; do
    ctr images import "$IMAGES/$t.tar" >/dev/null
  done
  log "images imported: $(ctr images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}

# --- commands ------------------------------------------------------------

cmd_up() {
  local started=$SECONDS
  install_packages
  bash "$here/cluster/build.sh"
  mkdir -p "$DIR" "$LOGS" "$RUN"
  network_up
  pki
  for c in admin kubelet kube-proxy controller-manager scheduler coredns; do kubeconfig "$c"; done
  control_plane_up
  containerd_up
  build_images
  import_images
  node_up
  bootstrap_objects
  volumes_up
  wait_for "node $NODE to be Ready" 180 node_ready || die "node not Ready; see $LOGS/kubelet.log"
  wait_for "CoreDNS" 60 dns_ready || die "CoreDNS does not answer; see $LOGS/coredns.log"
  wait_for "the default ServiceAccount" 60 kubectl get serviceaccount default
  log "up in $((SECONDS - started))s; kubectl and the other binaries are in $BIN"
  echo "export PATH=$BIN:\$PATH"
  echo "export KUBECONFIG=$(user_kubeconfig)"
}

# The admin kubeconfig for whoever called this script: under sudo, a copy
# with the certificates inline that the calling user owns.
user_kubeconfig() {
  local user=${SUDO_USER:-root}
  if [ "$user" = root ]; then
    echo "$DIR/admin.kubeconfig"
    return
  fi
  local home out
  home=$(getent passwd "$user" | cut -d: -f6)
  out=$home/.kube/chorus-cluster.kubeconfig
  mkdir -p "$home/.kube"
  "$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" config view --raw --flatten >"$out"
  chown "$user" "$home/.kube" "$out"
  chmod 600 "$out"
  echo "$out"
}

cmd_images() {
  running containerd || die "the cluster is not up (scripts/cluster.sh up)"
  build_images
  import_images
}

cmd_status() {
  local p
  for p in $PROCESSES; do
    if running "$p"; then
      printf '%-24s running (pid %s)\n' "$p" "$(pid_of "$p")"
    else
      printf '%-24s stopped\n' "$p"
    fi
  done
  if running kube-apiserver; then
    kubectl get nodes -o wide || true
    kubectl get pods -A -o wide 2>/dev/null | head -40 || true
  fi
  if running containerd; then
    echo "images:"
    ctr images ls -q | grep -v '^sha256:' | sed 's/^/  /'
  fi
  echo "logs: $LOGS"
  running kube-apiserver && echo "export KUBECONFIG=$(user_kubeconfig)"
}

# The kubelet's own chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...), which
# kube-proxy --cleanup leaves, and a nat table that holds nothing else: an
# idle nat table still sends every packet through connection tracking
# (measured: about 1.2 µs more per loopback write).
remove_kubelet_rules() {
  local cmd table chain
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle; do
      for chain in INPUT OUTPUT FORWARD PREROUTING POSTROUTING; do
        while "$cmd" -t "$table" -S "$chain" 2>/dev/null | grep -q -- '-j KUBE-'; do
          local rule
          rule=$("$cmd" -t "$table" -S "$chain" | grep -m1 -- '-j KUBE-' | sed 's/^-A //')
          # shellcheck disable=SC2086
          "$cmd" -t "$table" -D $rule 2>/dev/null || break
        done
      done
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  if command -v nft >/dev/null; then
    local family
    for family in ip ip6; do
      # Only the built-in chains left, with no rules: nobody else uses it.
      if nft list table "$family" nat >/dev/null 2>&1 \
        && ! nft list table "$family" nat 2>/dev/null | grep -qvE '^\s*(table|chain|type|policy|\}|$)|^#'; then
        nft delete table "$family" nat 2>/dev/null || true
      fi
    done
  fi
}

cmd_down() {
  local purge=0
  [ "${1:-}" = --purge ] && purge=1
  # The pods' containers first, while containerd still runs: stopping the
  # kubelet leaves them running.
  stop kubelet
  if running containerd; then
    local ids
    ids=$(ctr tasks ls -q 2>/dev/null || true)
    for id in $ids; do ctr tasks kill -s KILL "$id" >/dev/null 2>&1 || true; done
    for id in $ids; do ctr tasks delete -f "$id" >/dev/null 2>&1 || true; done
    ids=$(ctr containers ls -q 2>/dev/null || true)
    for id in $ids; do ctr containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  local p
  for p in $(echo "$PROCESSES" | tr ' ' '\n' | tac); do stop "$p"; done
  # What the node left in the kernel: Service rules, the pod bridge, the
  # node address, the kubelet's mounts.
  [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  remove_kubelet_rules
  ip link del "$POD_BRIDGE" 2>/dev/null || true
  ip link del "$NODE_LINK" 2>/dev/null || true
  if [ -d "$DIR" ]; then
    grep -o " $DIR/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    grep -o " /run/chorus-containerd/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  if [ "$purge" = 1 ]; then
    rm -rf "$DIR" /run/chorus-containerd
    log "state removed ($DIR); binaries and root file systems stay in $CHORUS_CACHE"
  fi
}

case "${1:-}" in
  up | down | images | status) ;;
  build) exec bash "$here/cluster/build.sh" ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

# Kubernetes and the Chorus binaries are built as the invoking user, before
# the rest runs as root.
if [ "$(id -u)" != 0 ] && [ "$1" = up ]; then
  bash "$here/cluster/build.sh"
fi
if [ "$1" = up ] || [ "$1" = images ]; then
  [ -n "${CHORUS_CARGO_DONE:-}" ] || build_binaries
fi
if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=CHORUS_CACHE,CHORUS_CLUSTER_DIR,CHORUS_PROFILE,HOME,PATH,CARGO_TARGET_DIR \
    CHORUS_CARGO_DONE=1 bash "$0" "$@"
fi

case "$1" in
  up) cmd_up ;;
  down) shift; cmd_down "$@" ;;
  images) cmd_images ;;
  status) cmd_status ;;
esac
