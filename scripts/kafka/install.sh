#!/usr/bin/env bash
# Installs the jars of the Apache Kafka broker the tests run (pom.xml beside
# this file) into ~/.cache/chorus/kafka/<version>/lib, once: a second run
# finds them and does nothing. Needs java (17+) and mvn on PATH.
# Prints the lib directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
dest=${CHORUS_CACHE:-$HOME/.cache/chorus}/kafka/$version
if [ ! -f "$dest/lib/.complete" ]; then
  mkdir -p "$dest"
  tmp=$(mktemp -d "$dest/lib.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >&2
  touch "$tmp/.complete"
  # Another run may have finished first: keep whichever is complete.
  if [ ! -f "$dest/lib/.complete" ]; then rm -rf "$dest/lib"; mv "$tmp" "$dest/lib"; fi
fi
echo "$dest/lib"
