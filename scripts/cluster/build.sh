#!/usr/bin/env bash
# Builds the Kubernetes node: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy and kubectl from the k8s.io/kubernetes
# Go module, etcd from go.etcd.io/etcd, CoreDNS from its Go module, into
# $CHORUS_CACHE/k8s/<version>/bin. Only the Go module proxy is needed.
#
# Kubernetes' published go.mod keeps `replace k8s.io/X => ./staging/src/k8s.io/X`
# lines that a module outside its repository cannot use, so the build goes
# through a throw-away module that pins each of those staging modules to the
# matching v0.x release. Never `go mod tidy` that module: it drops the requires.
#
# A second run finds the binaries and returns at once; delete the version
# folder to rebuild.
set -euo pipefail

CACHE=${CHORUS_CACHE:-$HOME/.cache/chorus}
KV=${K8S_VERSION:-v1.34.4}          # k8s.io/kubernetes
ETCDV=${ETCD_VERSION:-v3.6.16}      # go.etcd.io/etcd
COREDNSV=${COREDNS_VERSION:-v1.14.7}
OUT=$CACHE/k8s/$KV/bin
WORK=$CACHE/k8s/$KV/src
SV=v0.${KV#v1.}                     # v1.34.4 -> v0.34.4
MINOR=$(echo "$KV" | cut -d. -f2)

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod

log() { echo "cluster build: $*" >&2; }

k8s_cmds="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
have_all=1
for b in $k8s_cmds etcd coredns; do [ -x "$OUT/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  log "reusing $OUT"
  exit 0
fi
mkdir -p "$OUT" "$WORK/k8s" "$WORK/etcd" "$WORK/coredns"

missing_k8s=0
for b in $k8s_cmds; do [ -x "$OUT/$b" ] || missing_k8s=1; done
if [ "$missing_k8s" = 1 ]; then
  log "Kubernetes $KV from the Go module proxy (cold: 20-35 min on 2 cores)"
  cd "$WORK/k8s"
  [ -f go.mod ] || go mod init chorus.local/k8sbuild >/dev/null 2>&1
  go mod edit -godebug=default=go1.24
  gomod=$(go mod download -json "k8s.io/kubernetes@$KV" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/.*#\1#p' "$gomod"); do
    go mod edit "-replace=$m=$m@$SV"
  done
  go get $(for c in $k8s_cmds; do echo "k8s.io/kubernetes/cmd/$c@$KV"; done)
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$KV -X $p.gitMajor=1 -X $p.gitMinor=$MINOR -X $p.gitTreeState=clean"
    ld="$ld -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  go build -trimpath -tags notest -ldflags "$ld" -o "$OUT/" \
    $(for c in $k8s_cmds; do echo "k8s.io/kubernetes/cmd/$c"; done)
fi

if [ ! -x "$OUT/etcd" ]; then
  # etcd's server module has replace directives, so `go install ...@v` is
  # refused; a throw-away module requiring it builds it.
  log "etcd $ETCDV"
  cd "$WORK/etcd"
  [ -f go.mod ] || go mod init chorus.local/etcdbuild >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCDV"
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
fi

if [ ! -x "$OUT/coredns" ]; then
  log "CoreDNS $COREDNSV"
  cd "$WORK/coredns"
  [ -f go.mod ] || go mod init chorus.local/corednsbuild >/dev/null 2>&1
  go get "github.com/coredns/coredns@$COREDNSV"
  go build -trimpath -ldflags "-s -w" -o "$OUT/coredns" github.com/coredns/coredns
fi

"$OUT/kube-apiserver" --version >&2
log "binaries in $OUT"
