#!/usr/bin/env bash
# The one-node cluster's storage provisioner, `chorus.dev/host-folder`,
# for StorageClass `local` (the default class). scripts/cluster.sh `up`
# runs it as its process "volumes" (pid file, log) and `down` stops it.
#
#   volumes.sh KUBECTL KUBECONFIG VOLUMES NODE   every 2 s: one pass
#
# A pass binds each Pending claim of class `local` to a new hostPath
# volume: a folder VOLUMES/<claim uid>, mode 0777 (the Redis pods run as
# uid 65532 and must write to it; the controller manager's host-path
# provisioner made root-owned 0750 folders they could not), and a
# PersistentVolume with a claimRef to that claim, its requested size and
# access modes, pinned to NODE. It deletes the Released volumes it made
# and their folders. One bad object is logged and skipped; the loop never
# stops on it.
#
# Sourced, it only defines volumes_once (scripts/cluster/test_volumes.sh
# runs one pass against a fake kubectl).

VOLUMES_PROVISIONER=chorus.dev/host-folder
VOLUMES_CLASS=local

volumes_log() { echo "volumes: $*" >&2; }
volumes_kubectl() { "$VOLUMES_KUBECTL" --kubeconfig "$VOLUMES_KUBECONFIG" "$@"; }

# Fields of a `kubectl get … -o json` list on stdin, one object a line,
# joined with `|` (no field holds one). A field is a dotted path (`\.` for
# a dot in a key); a list value is joined with spaces; absent is empty.
volumes_fields() {
  python3 -c '
import json, re, sys
def at(obj, path):
    for key in re.split(r"(?<!\\)\.", path):
        key = key.replace("\\.", ".")
        obj = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(obj, list):
        return " ".join(map(str, obj))
    return "" if obj is None else str(obj)
for item in json.load(sys.stdin).get("items", []):
    print("|".join(at(item, p) for p in sys.argv[1:]))
' "$@"
}

# The PersistentVolume for claim NS/NAME (uid UID) of SIZE with MODES, as JSON.
volumes_pv() {
  local ns=$1 name=$2 uid=$3 size=$4 modes=$5 path=$6
  local m json_modes=""
  for m in $modes; do json_modes+="${json_modes:+,}\"$m\""; done
  cat <<EOF
{"apiVersion": "v1", "kind": "PersistentVolume",
 "metadata": {"name": "pvc-$uid",
              "annotations": {"pv.kubernetes.io/provisioned-by": "$VOLUMES_PROVISIONER"}},
 "spec": {"capacity": {"storage": "$size"},
          "accessModes": [${json_modes:-\"ReadWriteOnce\"}],
          "persistentVolumeReclaimPolicy": "Delete",
          "storageClassName": "$VOLUMES_CLASS",
          "volumeMode": "Filesystem",
          "hostPath": {"path": "$path", "type": "Directory"},
          "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "namespace": "$ns", "name": "$name", "uid": "$uid"},
          "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
              {"key": "kubernetes.io/hostname", "operator": "In", "values": ["$VOLUMES_NODE"]}]}]}}}}
EOF
}

# One claim: its folder, then its volume.
volumes_provision() {
  local ns=$1 name=$2 uid=$3 size=$4 modes=$5 mode=$6
  if [ -z "$uid" ] || [ -z "$size" ]; then
    volumes_log "skipping $ns/$name: no uid or no requested size"
    return 1
  fi
  if [ "${mode:-Filesystem}" != Filesystem ]; then
    volumes_log "skipping $ns/$name: volumeMode $mode (only folders here)"
    return 1
  fi
  local dir=$VOLUMES/$uid
  mkdir -p "$dir" && chmod 0777 "$dir" || return 1
  volumes_pv "$ns" "$name" "$uid" "$size" "$modes" "$dir" | volumes_kubectl apply -f - >/dev/null || return 1
  volumes_log "bound $ns/$name to pvc-$uid ($size, $dir)"
}

# One Released volume: its folder, only if it is one folder right under
# VOLUMES, then the object.
volumes_reclaim() {
  local pv=$1 path=$2
  local folder=${path#"$VOLUMES"/}
  if [ "$folder" = "$path" ] || [ -z "$folder" ] || [[ $folder == */* || $folder == .* ]]; then
    volumes_log "not deleting $pv: its path '$path' is not a folder of $VOLUMES"
    return 1
  fi
  rm -rf -- "$path" || return 1
  volumes_kubectl delete pv "$pv" --wait=false >/dev/null || return 1
  volumes_log "deleted $pv and $path"
}

# One pass over the claims and the volumes.
volumes_once() {
  local claims volumes ns name uid class size phase volume modes mode
  if claims=$(volumes_kubectl get pvc -A -o json | volumes_fields metadata.namespace \
    metadata.name metadata.uid spec.storageClassName spec.resources.requests.storage \
    status.phase spec.volumeName spec.accessModes spec.volumeMode); then
    while IFS='|' read -r ns name uid class size phase volume modes mode; do
      [ "$class" = "$VOLUMES_CLASS" ] && [ "$phase" = Pending ] && [ -z "$volume" ] || continue
      volumes_provision "$ns" "$name" "$uid" "$size" "$modes" "$mode" ||
        volumes_log "could not provision $ns/$name; next pass tries again"
    done <<<"$claims"
  else
    volumes_log "could not list claims"
  fi
  local pv path by
  if volumes=$(volumes_kubectl get pv -o json | volumes_fields metadata.name \
    spec.storageClassName status.phase spec.hostPath.path \
    'metadata.annotations.pv\.kubernetes\.io/provisioned-by'); then
    while IFS='|' read -r pv class phase path by; do
      [ "$class" = "$VOLUMES_CLASS" ] && [ "$phase" = Released ] || continue
      [ "$by" = "$VOLUMES_PROVISIONER" ] || continue
      volumes_reclaim "$pv" "$path" || volumes_log "could not reclaim $pv"
    done <<<"$volumes"
  else
    volumes_log "could not list volumes"
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  [ "$#" = 4 ] || {
    echo "usage: $0 KUBECTL KUBECONFIG VOLUMES NODE" >&2
    exit 2
  }
  VOLUMES_KUBECTL=$1 VOLUMES_KUBECONFIG=$2 VOLUMES=$3 VOLUMES_NODE=$4
  mkdir -p "$VOLUMES"
  volumes_log "provisioning StorageClass $VOLUMES_CLASS ($VOLUMES_PROVISIONER) in $VOLUMES"
  while true; do
    volumes_once
    sleep 2 &
    wait $!
  done
fi
