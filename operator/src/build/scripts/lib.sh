# Shared by redis.sh and sentinel.sh (sourced): the member lists, bounded
# redis-cli calls, and what the sentinels and members say about the master.
# Environment: REDIS_PASSWORD, CHORUS_SELF, CHORUS_MASTER_NAME,
# CHORUS_CALL_TIMEOUT, and the lists (see peers and sentinels below).

export REDISCLI_AUTH="${REDIS_PASSWORD:-}"
self=$CHORUS_SELF
master_name=${CHORUS_MASTER_NAME:-chorus}
call_timeout=${CHORUS_CALL_TIMEOUT:-2}

# The member lists: from the group folder (re-read, so a scaled group
# needs no restart) or from CHORUS_PEERS and CHORUS_SENTINELS.
peers() {
  if [ -n "${CHORUS_GROUP_DIR:-}" ]; then cat "$CHORUS_GROUP_DIR/members"; else echo "$CHORUS_PEERS"; fi
}
sentinels() {
  if [ -n "${CHORUS_GROUP_DIR:-}" ]; then cat "$CHORUS_GROUP_DIR/sentinels"; else echo "$CHORUS_SENTINELS"; fi
}

# cli HOST:PORT ARGS…: one bounded redis-cli call, quiet on failure.
cli() {
  addr=$1
  shift
  timeout "$call_timeout" redis-cli --no-auth-warning -h "${addr%:*}" -p "${addr##*:}" "$@" 2>/dev/null \
    | tr -d '\r'
}

# The master the sentinel at $1 monitors, as host:port (empty: none).
monitored_by() {
  reply=$(cli "$1" SENTINEL GET-MASTER-ADDR-BY-NAME "$master_name")
  host=$(echo "$reply" | sed -n 1p)
  port=$(echo "$reply" | sed -n 2p)
  case "$port" in '' | *[!0-9]*) return ;; esac
  [ -n "$host" ] && echo "$host:$port"
}

# The master most of the answering sentinels (but $1) name (empty: none).
most_named_master() {
  for s in $(sentinels); do
    [ "$s" = "${1:-}" ] || monitored_by "$s"
  done | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }'
}

# A member (but $1) that serves as master, if any.
serving_master() {
  for p in $(peers); do
    [ "$p" = "${1:-}" ] && continue
    if [ "$(cli "$p" ROLE | sed -n 1p)" = master ]; then
      echo "$p"
      return
    fi
  done
}
