#!/usr/bin/env bash
# Runs the whole Chorus test suite on this machine.
#
# First installs what the tests need and is missing (redis-server and
# redis-sentinel from Debian's packages, Python tools from PyPI), so a fresh
# Debian machine with a Rust toolchain needs nothing else. Tests start their
# own redis-server / redis-sentinel processes on free ports; nothing is
# expected to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

echo "test.sh: redis $(redis-server --version | awk '{print $3}')"
cargo test --workspace --locked "$@"
