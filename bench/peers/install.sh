#!/usr/bin/env bash
# Installs the peers chorus-bench runs side by side with Chorus (not part of
# CI: benchmarks only), idempotently, outside the repository:
#   Centrifugo  $CENTRIFUGO_VERSION, `go install` from the Go module proxy
#   Socket.IO   socket.io + @socket.io/redis-adapter + redis, `npm ci` from
#               the npm registry, at the versions pinned in socketio/package-lock.json
# into ${CHORUS_BENCH_PEERS:-~/.cache/chorus/bench} (the bench looks there).
# Needs: go (1.24+), node (18+) and npm.
set -euo pipefail

CENTRIFUGO_VERSION=v6.9.1
here="$(cd "$(dirname "$0")" && pwd)"
dest="${CHORUS_BENCH_PEERS:-$HOME/.cache/chorus/bench}"
mkdir -p "$dest/bin" "$dest/socketio"

# `go install` leaves no version in the binary: a file beside it says which.
if [[ ! -x "$dest/bin/centrifugo" || "$(cat "$dest/bin/centrifugo.version" 2>/dev/null)" != "$CENTRIFUGO_VERSION" ]]; then
    echo "installing centrifugo $CENTRIFUGO_VERSION into $dest/bin"
    GOBIN="$dest/bin" go install "github.com/centrifugal/centrifugo/v6@$CENTRIFUGO_VERSION"
    echo "$CENTRIFUGO_VERSION" > "$dest/bin/centrifugo.version"
fi

if ! cmp -s "$here/socketio/package-lock.json" "$dest/socketio/package-lock.json" \
    || [[ ! -d "$dest/socketio/node_modules" ]]; then
    echo "installing socket.io into $dest/socketio"
    cp "$here/socketio/package.json" "$here/socketio/package-lock.json" "$dest/socketio/"
    (cd "$dest/socketio" && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "centrifugo $(cat "$dest/bin/centrifugo.version")"
node -e "console.log('socket.io', require('$dest/socketio/node_modules/socket.io/package.json').version)"
