#!/usr/bin/env bash
# Chorus, Centrifugo and Socket.IO side by side: the same scenarios, each
# run on a fresh 3-node fleet on one Redis, interleaved (round by round:
# every scenario, every target), JSON lines appended to one file, then the
# medians (bench/peers/medians.py). Run bench/peers/install.sh first.
#
#   bench/peers/compare.sh [rounds] [out.jsonl]
#
# Environment: B (the chorus-bench binary, default target/release),
# FANOUT_MESSAGES (1000), SATURATE_SECONDS (5), SATURATE_SUBSCRIBERS (600),
# IDLE_PER_NODE (2000), TARGETS ("chorus centrifugo socketio").
# The loopback floor is measured after each Chorus fanout run (the same
# frame size, sockets and rate); the peers' runs skip it and are set
# against the same round's floor.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rounds="${1:-3}"
out="${2:-compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
B="${B:-$here/../../target/release/chorus-bench}"
targets="${TARGETS:-chorus centrifugo socketio}"

run() { # round target scenario args...
    local round=$1 target=$2 scenario=$3
    shift 3
    local floor=(--no-floor)
    [[ $target == chorus && $scenario == fanout ]] && floor=()
    echo "round $round: $target $scenario" >&2
    "$B" --target "$target" "${floor[@]}" "$scenario" "$@" \
        | grep '^{' | jq -c --argjson round "$round" '. + {round: $round}' >> "$out"
}

for round in $(seq 1 "$rounds"); do
    for t in $targets; do run "$round" "$t" fanout --messages "${FANOUT_MESSAGES:-1000}"; done
    for t in $targets; do
        run "$round" "$t" saturate --duration "${SATURATE_SECONDS:-5}" \
            --subscribers "${SATURATE_SUBSCRIBERS:-600}"
    done
    for t in $targets; do run "$round" "$t" idle --per-node "${IDLE_PER_NODE:-2000}"; done
done
python3 "$here/medians.py" "$out"
