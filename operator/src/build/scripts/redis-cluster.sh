#!/bin/sh
# A pod of a managed Redis Cluster (`redis.mode: cluster`).
#
# `start` writes redis.conf to /tmp (it holds the password: mode 0600) and
# runs redis-server in cluster mode with its node table (nodes.conf) on the
# data volume, so a restarted container keeps its node id, slots and role.
# The operator joins the pods (CLUSTER MEET), assigns slots and replicas,
# and meets a pod again when it comes back with a new IP.
#
# Environment: REDIS_PASSWORD; CHORUS_SELF (this pod's DNS name and port);
# CHORUS_NODE_TIMEOUT_MS (cluster-node-timeout); CHORUS_REDIS_CONF (extra
# redis.conf lines); CHORUS_DATA (data folder, default /data); CHORUS_CONF
# (where to write redis.conf, default /tmp/redis.conf).
set -eu

start() {
  umask 077
  conf=${CHORUS_CONF:-/tmp/redis.conf}
  cat >"$conf" <<END_OF_CONFIG
port ${CHORUS_SELF##*:}
dir ${CHORUS_DATA:-/data}
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout ${CHORUS_NODE_TIMEOUT_MS:-5000}
cluster-announce-hostname ${CHORUS_SELF%:*}
requirepass "${REDIS_PASSWORD:-}"
masterauth "${REDIS_PASSWORD:-}"
${CHORUS_REDIS_CONF:-}
END_OF_CONFIG
  exec redis-server "$conf"
}

case "${1:-}" in
  start) start ;;
  *)
    echo "usage: redis-cluster.sh start" >&2
    exit 2
    ;;
esac
