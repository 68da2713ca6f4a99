#!/usr/bin/env bash
# One pass of the host-folder provisioner (scripts/cluster/volumes.sh)
# against a fake kubectl that serves claims and volumes as the API server
# lists them and records what it is asked to apply and delete. No cluster
# needed; run by `cargo test -p chorus-tests --test cluster_volumes`, or
# directly: bash scripts/cluster/test_volumes.sh (prints "ok", exits 0).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

claim() { # NAME UID CLASS PHASE [SIZE] [VOLUME]
  cat <<EOF
{"metadata": {"namespace": "team", "name": "$1", "uid": "$2"},
 "spec": {"storageClassName": "$3", "accessModes": ["ReadWriteOnce"],
          "resources": {"requests": {"storage": "${5:-1Gi}"}}${6:+, \"volumeName\": \"$6\"}},
 "status": {"phase": "$4"}}
EOF
}

volume() { # NAME CLASS PHASE PATH [PROVISIONER]
  cat <<EOF
{"metadata": {"name": "$1", "annotations": {"pv.kubernetes.io/provisioned-by": "${5:-chorus.dev/host-folder}"}},
 "spec": {"storageClassName": "$2", "hostPath": {"path": "$4"}},
 "status": {"phase": "$3"}}
EOF
}

volumes=$work/volumes
mkdir -p "$volumes/released-uid" "$volumes/bystander"
touch "$volumes/released-uid/appendonly.aof"
{
  echo '{"kind": "PersistentVolumeClaimList", "items": ['
  claim data-chat-redis-0 uid-0 local Pending 5Gi
  echo ,
  claim data-chat-redis-1 uid-1 local Bound 1Gi pvc-uid-1 # bound already
  echo ,
  claim other uid-2 fast Pending # another class
  echo ,
  claim refused uid-3 local Pending 1Gi # the fake API server refuses it
  echo ,
  claim data-chat-redis-2 uid-4 local Pending 2Gi # after the refused one
  echo ']}'
} >"$work/pvcs.json"
{
  echo '{"kind": "PersistentVolumeList", "items": ['
  volume pvc-released local Released "$volumes/released-uid"
  echo ,
  volume pvc-bound local Bound "$volumes/bystander"
  echo ,
  volume pvc-escape local Released "$volumes/../../etc"
  echo ,
  volume pvc-foreign local Released "$volumes/bystander" kubernetes.io/host-path
  echo ,
  volume pvc-fast fast Released "$volumes/bystander"
  echo ']}'
} >"$work/pvs.json"

cat >"$work/kubectl" <<EOF
#!/usr/bin/env bash
# Fake kubectl: --kubeconfig FILE then the command.
[ "\$1" = --kubeconfig ] && [ "\$2" = "$work/admin.kubeconfig" ] || { echo "no kubeconfig: \$*" >&2; exit 1; }
shift 2
case "\$*" in
  "get pvc -A -o json") cat "$work/pvcs.json" ;;
  "get pv -o json") cat "$work/pvs.json" ;;
  "apply -f -")
    body=\$(cat)
    if grep -q '"name": "refused"' <<<"\$body"; then echo "refused" >&2; exit 1; fi
    echo "\$body" >>"$work/applied.jsonl"
    ;;
  "delete pv "*" --wait=false") echo "\$3" >>"$work/deleted" ;;
  *) echo "unexpected: \$*" >&2; exit 1 ;;
esac
EOF
chmod +x "$work/kubectl"

# shellcheck source=volumes.sh
source "$here/volumes.sh"
VOLUMES_KUBECTL=$work/kubectl VOLUMES_KUBECONFIG=$work/admin.kubeconfig
VOLUMES=$volumes VOLUMES_NODE=chorus-node
volumes_once 2>"$work/log"

# Two volumes: the refused claim did not stop the one after it.
python3 - "$work/applied.jsonl" "$volumes" <<'PY' || fail "applied volumes (log: $(cat "$work/log"))"
import json, sys
text = open(sys.argv[1]).read()
decoder, pvs, i = json.JSONDecoder(), [], 0
while i < len(text):
    if text[i].isspace():
        i += 1
        continue
    pv, i = decoder.raw_decode(text, i)
    pvs.append(pv)
assert [pv["metadata"]["name"] for pv in pvs] == ["pvc-uid-0", "pvc-uid-4"], pvs
pv = pvs[0]
spec = pv["spec"]
assert spec["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "namespace": "team", "name": "data-chat-redis-0", "uid": "uid-0"}, spec
assert spec["capacity"] == {"storage": "5Gi"}, spec
assert spec["accessModes"] == ["ReadWriteOnce"], spec
assert spec["storageClassName"] == "local" and spec["persistentVolumeReclaimPolicy"] == "Delete", spec
assert spec["hostPath"] == {"path": sys.argv[2] + "/uid-0", "type": "Directory"}, spec
terms = spec["nodeAffinity"]["required"]["nodeSelectorTerms"]
assert terms[0]["matchExpressions"][0]["values"] == ["chorus-node"], terms
assert pv["metadata"]["annotations"] == {"pv.kubernetes.io/provisioned-by": "chorus.dev/host-folder"}
assert pvs[1]["spec"]["capacity"] == {"storage": "2Gi"}
PY

for uid in uid-0 uid-4; do
  [ "$(stat -c %a "$volumes/$uid")" = 777 ] || fail "$volumes/$uid is not mode 0777"
done
[ ! -e "$volumes/uid-1" ] && [ ! -e "$volumes/uid-2" ] || fail "a folder for a bound or foreign claim"
grep -q "could not provision team/refused" "$work/log" || fail "the refusal is not logged: $(cat "$work/log")"

# Only our Released volume went, with its folder; the escaping path is refused.
[ "$(cat "$work/deleted")" = pvc-released ] || fail "deleted: $(cat "$work/deleted")"
[ ! -e "$volumes/released-uid" ] || fail "the released folder is still there"
[ -d "$volumes/bystander" ] || fail "a folder that is not Released was deleted"
grep -q "not deleting pvc-escape" "$work/log" || fail "the escaping path is not logged: $(cat "$work/log")"

# A second pass with the API server down logs and returns.
VOLUMES_KUBECTL=false
volumes_once 2>"$work/log2" || fail "a pass failed with the API server down"
grep -q "could not list claims" "$work/log2" || fail "no log line with the API server down"

echo ok
