#!/usr/bin/env bash
# Make sure a nats-server binary is available (Debian's package, 2.9.x with JetStream), installing
# it from the distribution when missing. Prints the binary's path. Used by the test and run scripts.
set -euo pipefail

find_server() {
  if [ -n "${TOUCHLEDGER_NATS_SERVER:-}" ] && [ -x "$TOUCHLEDGER_NATS_SERVER" ]; then
    echo "$TOUCHLEDGER_NATS_SERVER"; return 0
  fi
  command -v nats-server 2>/dev/null && return 0
  [ -x /usr/sbin/nats-server ] && { echo /usr/sbin/nats-server; return 0; }
  return 1
}

if ! find_server; then
  echo "nats-server not found; installing Debian's nats-server package" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >&2
  find_server
fi
