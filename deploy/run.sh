#!/usr/bin/env bash
# The README's main command: build touchledger, make sure a NATS server with JetStream is
# reachable (start a local one on the given port with its data in ./data/nats if none answers,
# installing Debian's nats-server package if missing), then run `touchledger serve` on the
# embedded sled store in ./data/ledger. Ctrl-C stops the ledger cleanly (and the NATS server this
# script started).
#
# Environment: TOUCHLEDGER_NATS_URL (default nats://127.0.0.1:4222), TOUCHLEDGER_DATA
# (default ./data/ledger), and every other TOUCHLEDGER_* setting `touchledger serve --help` lists.
set -euo pipefail
cd "$(dirname "$0")/.."

URL="${TOUCHLEDGER_NATS_URL:-nats://127.0.0.1:4222}"
HOSTPORT="${URL#*://}"; HOSTPORT="${HOSTPORT%%,*}"; HOSTPORT="${HOSTPORT##*@}"
HOST="${HOSTPORT%%:*}"; PORT="${HOSTPORT##*:}"
export TOUCHLEDGER_DATA="${TOUCHLEDGER_DATA:-./data/ledger}"

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger

reachable() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

NATS_PID=""
if reachable; then
  echo "using the NATS server at $URL"
else
  SERVER="$(bash deploy/ensure-nats-server.sh)"
  mkdir -p ./data/nats
  echo "no NATS server at $URL; starting $SERVER with JetStream (data in ./data/nats)"
  "$SERVER" -c deploy/nats/single.conf -a "$HOST" -p "$PORT" -sd ./data/nats -l ./data/nats/server.log &
  NATS_PID=$!
  trap '[ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do reachable && break; sleep 0.1; done
  reachable || { echo "nats-server did not start; see ./data/nats/server.log" >&2; exit 1; }
fi

export TOUCHLEDGER_NATS_URL="$URL"
echo "touchledger serve: data $TOUCHLEDGER_DATA, NATS $URL (Ctrl-C to stop)"
"$BIN" serve
