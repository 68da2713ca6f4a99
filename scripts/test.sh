#!/usr/bin/env bash
# Runs the whole Chorus test suite on this machine.
#
# First installs what the tests need and is missing (redis-server,
# redis-sentinel, postgresql, a Java runtime and Maven from Debian's
# packages, the Apache Kafka broker's jars from Maven Central, Prometheus
# unpacked from Debian's package, pytest, helm-python-sdk and PyYAML from
# PyPI for the chart tests and the monitoring tests), so a fresh Debian
# machine with a Rust toolchain, Go, python3 and pip needs nothing else.
# Tests start their own redis-server / redis-sentinel / PostgreSQL / Kafka
# processes on free ports; nothing is expected to be running beforehand
# (PostgreSQL refuses root: run as root, the test kit starts it as the
# `postgres` user the package creates, or $CHORUS_PG_USER).
#
# Then the end-to-end suite (tests/tests/e2e.rs) runs on a real one-node
# Kubernetes cluster that scripts/cluster.sh builds (cached under
# ~/.cache/chorus: the first run builds Kubernetes from its Go module, in
# the background while the other tests run) and starts with images of this
# tree. It needs root (or sudo). CHORUS_E2E=0 leaves it out; a cluster this
# script started is stopped again at the end (CHORUS_KEEP_CLUSTER=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
e2e=${CHORUS_E2E:-1}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
# Debian puts postgres and initdb in /usr/lib/postgresql/<version>/bin.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
# The Kafka tests run a real broker (Java 17+) from Maven Central's jars.
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The monitoring tests load the chart's alerts into a real Prometheus
# (tests/tests/monitoring.rs) and run each alert's rules test through
# promtool (charts/chorus/tests/test_alerts.py): Debian's package, which has
# both, unpacked rather than installed (no service starts) under
# ~/.cache/chorus/prometheus, where the tests look when they are not on PATH.
# A 19 MB download (about 100 MB unpacked) and a few seconds.
prom_dir="$HOME/.cache/chorus/prometheus"
if ! { command -v prometheus && command -v promtool; } >/dev/null 2>&1 \
  && ! [ -x "$prom_dir/usr/bin/prometheus" -a -x "$prom_dir/usr/bin/promtool" ]; then
  echo "test.sh: unpacking Debian's prometheus into $prom_dir"
  deb_dir=$(mktemp -d)
  chmod a+rwx "$deb_dir" # apt's download sandbox user writes there
  if ! (cd "$deb_dir" && apt-get download -qq prometheus 2>/dev/null); then
    as_root apt-get update -qq
    (cd "$deb_dir" && apt-get download -qq prometheus)
  fi
  mkdir -p "$prom_dir"
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$prom_dir"
  rm -rf "$deb_dir"
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

# Apache Kafka's jars, once, cached in ~/.cache/chorus/kafka (about 45 MB).
kafka_lib=$(bash scripts/kafka/install.sh)
echo "test.sh: redis $(redis-server --version | awk '{print $3}'), postgresql $(ls /usr/lib/postgresql | sort -n | tail -n 1), kafka $(basename "$(dirname "$kafka_lib")")"

if [ "$e2e" = 1 ]; then
  # The Kubernetes build is long on a cold machine and mostly waits on
  # downloads at first: start it now, below the tests' priority.
  build_log=$(mktemp)
  nice -n 10 bash scripts/cluster/build.sh >"$build_log" 2>&1 &
  build_pid=$!
fi

cargo test --workspace --locked "$@"
python3 -m pytest charts/chorus/tests -q -p no:cacheprovider

if [ "$e2e" != 1 ]; then
  echo "test.sh: end-to-end suite skipped (CHORUS_E2E=$e2e)"
  exit 0
fi
if ! wait "$build_pid"; then
  cat "$build_log"
  echo "test.sh: building Kubernetes failed" >&2
  exit 1
fi
tail -n 1 "$build_log"
was_up=0
bash scripts/cluster.sh status 2>/dev/null | grep -q '^kubelet .*running' && was_up=1
# The images take the debug binaries the tests above just built.
cluster_env=$(CHORUS_PROFILE=debug bash scripts/cluster.sh up | tail -n 2)
eval "$cluster_env"
if [ "$was_up" = 0 ] && [ "${CHORUS_KEEP_CLUSTER:-0}" != 1 ]; then
  trap 'bash scripts/cluster.sh down >/dev/null 2>&1 || true' EXIT
fi
CHORUS_E2E=1 cargo test -p chorus-tests --test e2e --locked -- --nocapture
