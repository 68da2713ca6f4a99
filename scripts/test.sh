#!/usr/bin/env bash
# Runs the whole Chorus test suite on this machine.
#
# First installs what the tests need and is missing (redis-server and
# redis-sentinel from Debian's packages, pytest, helm-python-sdk and PyYAML
# from PyPI for the chart tests), so a fresh Debian machine with a Rust
# toolchain, python3 and pip needs nothing else. Tests start their
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

# Chart tests: the real Helm engine through helm-python-sdk (Helm v4 as a
# library; no helm binary or cluster needed), PyYAML to read what it renders.
py_missing=()
python3 -c 'import pytest' >/dev/null 2>&1 || py_missing+=(pytest)
python3 -c 'import helm_python' >/dev/null 2>&1 || py_missing+=(helm-python-sdk)
python3 -c 'import yaml' >/dev/null 2>&1 || py_missing+=(pyyaml)
if [ "${#py_missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${py_missing[*]} from PyPI"
  # Debian's own Python is externally managed (PEP 668): there, install
  # these test tools for this user only.
  python3 -m pip install --quiet "${py_missing[@]}" 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages "${py_missing[@]}"
fi

echo "test.sh: redis $(redis-server --version | awk '{print $3}')"
cargo test --workspace --locked "$@"
python3 -m pytest charts/chorus/tests -q -p no:cacheprovider
