#!/bin/sh
# One Redis member of a Chorus-managed Sentinel group: `redis.sh start`
# (the container's command), `ready` (readiness), `alive` (liveness),
# `prestop` (before the pod stops).
#
# A member never serves on its port before it knows its role. It starts
# redis-server in a waiting room (its port + 1, which no peer, sentinel or
# server uses), loads whatever data it has, then decides:
#   - the sentinels name another member: become its replica;
#   - the sentinels name this member: become master, unless this member
#     holds no data while a peer does (a master that restarted empty: the
#     sentinels fail over to a replica that kept the data, since nothing
#     answers on this member's port meanwhile);
#   - the sentinels know nothing (or none answers): a peer that is master
#     is followed; a peer holding data means the operator must choose, so
#     wait; only pod 0 of a group where no one holds data becomes master.
# then moves to its port. Replicas therefore never sync from an empty pod
# that still carries the old master's name.
#
# Environment: REDIS_PASSWORD; CHORUS_SELF (this member, host:port, host as
# announced to the sentinels); CHORUS_PEERS and CHORUS_SENTINELS (host:port
# lists, spaces between; or files `members` and `sentinels` in
# CHORUS_GROUP_DIR); CHORUS_MASTER_NAME; CHORUS_BOOTSTRAP (the member that
# starts a new group: this one when it equals CHORUS_SELF);
# CHORUS_DATA (data folder); CHORUS_CONF (where to write redis.conf, which
# holds the password: default /tmp/redis.conf); CHORUS_REDIS_CONF (extra
# redis.conf lines); CHORUS_CALL_TIMEOUT (seconds per call, default 2);
# CHORUS_PRESTOP_SECONDS (how long a stopping master waits for a new one).
set -u

. "$(dirname "$0")/lib.sh"
self_host=${self%:*}
self_port=${self##*:}
wait_port=$((self_port + 1))

log() { echo "chorus-redis: $*" >&2; }

# Keys held by the server at HOST:PORT (empty when it does not answer).
keys_at() {
  n=$(cli "$1" DBSIZE)
  case "$n" in '' | *[!0-9]*) echo "" ;; *) echo "$n" ;; esac
}

holds_data() {
  n=$(keys_at "$1")
  [ -n "$n" ] && [ "$n" -gt 0 ]
}

# A peer (serving, or in its waiting room) holds data.
peer_holds_data() {
  for p in $(peers); do
    [ "$p" = "$self" ] && continue
    if holds_data "$p" || holds_data "${p%:*}:$((${p##*:} + 1))"; then
      return 0
    fi
  done
  return 1
}

# Prints `replica HOST:PORT`, `master` or `wait <why>`.
decide() {
  m=$(most_named_master)
  if [ -n "$m" ] && [ "$m" != "$self" ]; then
    echo "replica $m"
  elif [ -n "$m" ]; then
    if holds_data "127.0.0.1:$wait_port" || ! peer_holds_data; then
      echo master
    else
      echo "wait: the sentinels still name this member, which restarted empty, while a peer holds data"
    fi
  else
    m=$(serving_master "$self")
    if [ -n "$m" ]; then
      echo "replica $m"
    elif peer_holds_data; then
      echo "wait: no sentinel names a master and peers hold data: the operator chooses"
    elif [ "${CHORUS_BOOTSTRAP:-}" = "$self" ]; then
      echo master
    else
      echo "wait: a new group, waiting for its first member to become master"
    fi
  fi
}

start() {
  umask 077
  conf=${CHORUS_CONF:-/tmp/redis.conf}
  cat >"$conf" <<END_OF_CONFIG
port $wait_port
dir ${CHORUS_DATA:-/data}
requirepass "${REDIS_PASSWORD:-}"
masterauth "${REDIS_PASSWORD:-}"
replica-announce-ip $self_host
replica-announce-port $self_port
${CHORUS_REDIS_CONF:-}
END_OF_CONFIG
  redis-server "$conf" &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null' TERM INT
  until [ "$(cli "127.0.0.1:$wait_port" PING)" = PONG ]; do
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
    sleep 0.2
  done
  last=""
  while :; do
    role=$(decide)
    case "$role" in
      wait*)
        [ "$last" = "$role" ] || log "$role"
        last=$role
        ;;
      master)
        cli "127.0.0.1:$wait_port" REPLICAOF NO ONE >/dev/null
        break
        ;;
      replica\ *)
        m=${role#replica }
        cli "127.0.0.1:$wait_port" REPLICAOF "${m%:*}" "${m##*:}" >/dev/null
        break
        ;;
    esac
    kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
    sleep 1
  done
  if [ "$(cli "127.0.0.1:$wait_port" CONFIG SET port "$self_port")" != OK ]; then
    log "could not move to port $self_port"
    kill -TERM "$pid"
  fi
  log "serving on port $self_port as $role"
  wait "$pid"
  status=$?
  # A TERM trap interrupts `wait`: wait for redis-server to finish saving.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done
  exit $status
}

# Ready: a master, or a replica whose link to its master is up.
ready() {
  info=$(cli "127.0.0.1:$self_port" INFO replication)
  case "$info" in
    *role:master*) exit 0 ;;
    *master_link_status:up*) exit 0 ;;
    *) exit 1 ;;
  esac
}

alive() {
  [ "$(cli "127.0.0.1:$self_port" PING)" = PONG ] && exit 0
  [ "$(cli "127.0.0.1:$wait_port" PING)" = PONG ] && exit 0
  exit 1
}

# A master hands over before it stops: the sentinels fail over and this
# pod waits (bounded by CHORUS_PRESTOP_SECONDS) until they name another.
prestop() {
  [ "$(cli "127.0.0.1:$self_port" ROLE | sed -n 1p)" = master ] || exit 0
  # Nobody to hand over to (the whole group is going away, or no replica
  # is attached): stop at once.
  case "$(cli "127.0.0.1:$self_port" INFO replication)" in
    *connected_slaves:0*) exit 0 ;;
  esac
  asked=""
  for s in $(sentinels); do
    if [ "$(cli "$s" SENTINEL FAILOVER "$master_name")" = OK ]; then
      asked=$s
      break
    fi
  done
  [ -n "$asked" ] || { log "no sentinel took the failover; stopping"; exit 0; }
  deadline=$(($(date +%s) + ${CHORUS_PRESTOP_SECONDS:-30}))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    m=$(most_named_master)
    [ -n "$m" ] && [ "$m" != "$self" ] && { log "handed over to $m"; exit 0; }
    sleep 0.5
  done
  log "no other master within ${CHORUS_PRESTOP_SECONDS:-30}s; stopping anyway"
}

case "${1:-}" in
  start) start ;;
  ready) ready ;;
  alive) alive ;;
  prestop) prestop ;;
  decide) decide ;;
  *) echo "usage: redis.sh start|ready|alive|prestop|decide" >&2; exit 2 ;;
esac
