#!/bin/sh
# One sentinel of a Chorus-managed group: `sentinel.sh start` (the
# container's command), `ready` (readiness and liveness).
#
# The sentinel runs with a password (`requirepass`, and `sentinel-pass`
# between sentinels), announces its host name and resolves the members' by
# DNS, so pods keep their identity when their addresses change. Beside it,
# a loop gives a sentinel that monitors nothing (a new or restarted pod) the
# master its peers monitor or, when none does, the member that serves as
# master; it never chooses a master itself (the Redis members and the
# operator do).
#
# Environment: REDIS_PASSWORD (of the members and the sentinels); CHORUS_SELF
# (host:port announced to peers); CHORUS_PEERS (Redis members) and
# CHORUS_SENTINELS (host:port lists, or files `members` and `sentinels` in
# CHORUS_GROUP_DIR); CHORUS_MASTER_NAME; CHORUS_QUORUM;
# CHORUS_DOWN_AFTER_MS; CHORUS_FAILOVER_TIMEOUT_MS; CHORUS_DATA (where
# sentinel.conf lives); CHORUS_CALL_TIMEOUT (seconds per call, default 2).
set -u

. "$(dirname "$0")/lib.sh"

log() { echo "chorus-sentinel: $*" >&2; }

# What this sentinel should monitor: what most peers monitor, else the
# member serving as master.
master_to_monitor() {
  m=$(most_named_master "$self")
  if [ -n "$m" ]; then echo "$m"; else serving_master; fi
}

monitor() {
  m=$(for s in $(sentinels); do
    [ "$s" = "$self" ] || monitored_by "$s"
  done | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }')
  if [ -n "$m" ]; then
    echo "$m"
    return
  fi
  for p in $(peers); do
    if [ "$(cli "$p" ROLE | sed -n 1p)" = master ]; then
      echo "$p"
      return
    fi
  done
}

monitor() {
  local_addr="127.0.0.1:${self##*:}"
  cli "$local_addr" SENTINEL MONITOR "$master_name" "${1%:*}" "${1##*:}" "${CHORUS_QUORUM:-2}" >/dev/null
  cli "$local_addr" SENTINEL SET "$master_name" auth-pass "${REDIS_PASSWORD:-}" \
    down-after-milliseconds "${CHORUS_DOWN_AFTER_MS:-5000}" \
    failover-timeout "${CHORUS_FAILOVER_TIMEOUT_MS:-30000}" parallel-syncs 1 >/dev/null
  log "monitoring $1"
}

start() {
  umask 077
  data=${CHORUS_DATA:-/data}
  conf=$data/sentinel.conf
  # Sentinel rewrites its file (epochs, known peers and replicas): kept
  # across container restarts, only written when missing.
  if [ ! -f "$conf" ]; then
    cat >"$conf" <<END_OF_CONFIG
port ${self##*:}
dir $data
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${self%:*}
sentinel announce-port ${self##*:}
requirepass "${REDIS_PASSWORD:-}"
sentinel sentinel-pass "${REDIS_PASSWORD:-}"
END_OF_CONFIG
  fi
  redis-server "$conf" --sentinel &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null' TERM INT
  local_addr="127.0.0.1:${self##*:}"
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(cli "$local_addr" PING)" = PONG ] && [ -z "$(monitored_by "$local_addr")" ]; then
      m=$(master_to_monitor)
      [ -n "$m" ] && monitor "$m"
    fi
    sleep 2
  done
  wait "$pid"
}

ready() {
  [ "$(cli "127.0.0.1:${self##*:}" PING)" = PONG ]
}

case "${1:-}" in
  start) start ;;
  ready) ready ;;
  *) echo "usage: sentinel.sh start|ready" >&2; exit 2 ;;
esac
