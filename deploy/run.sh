#!/usr/bin/env bash
# The README's main command: build touchledger, make sure a NATS server with JetStream is
# reachable (start a local one on the given port with its data in ./data/nats if none answers,
# with a nats-server >= 2.10 from deploy/ensure-nats-server.sh, which installs the pinned release
# when the machine has none), run `touchledger serve` on the embedded
# sled store in ./data/ledger (ledger, read models, HTTP API and dashboard), start the seeded demo
# traffic, and print the dashboard's URL. Ctrl-C stops everything cleanly (and the NATS server
# this script started).
#
# Environment: TOUCHLEDGER_NATS_URL (default nats://127.0.0.1:4222), TOUCHLEDGER_DATA
# (default ./data/ledger), TOUCHLEDGER_HTTP_ADDR (default 127.0.0.1:8080), TOUCHLEDGER_DEMO
# (default 1; 0 = no demo traffic), TOUCHLEDGER_DEMO_RATE (live events/s, default 1), and every
# other TOUCHLEDGER_* setting `touchledger serve --help` lists.
set -euo pipefail
cd "$(dirname "$0")/.."

URL="${TOUCHLEDGER_NATS_URL:-nats://127.0.0.1:4222}"
HOSTPORT="${URL#*://}"; HOSTPORT="${HOSTPORT%%,*}"; HOSTPORT="${HOSTPORT##*@}"
HOST="${HOSTPORT%%:*}"; PORT="${HOSTPORT##*:}"
export TOUCHLEDGER_DATA="${TOUCHLEDGER_DATA:-./data/ledger}"

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger

reachable() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }
# The version in the server's INFO greeting (empty when it cannot be read).
greeting_version() {
  ( exec 3<>"/dev/tcp/$HOST/$PORT" && read -r -t 2 line <&3 && echo "$line" ) 2>/dev/null \
    | sed -n 's/.*"version":"\([0-9][0-9.]*\)".*/\1/p' || true
}
MIN="$(sed -n 's/^MIN=//p' deploy/ensure-nats-server.sh)"

NATS_PID=""
start_own=1
if reachable; then
  found="$(greeting_version)"
  if [ -z "$found" ] || printf '%s\n%s\n' "$MIN" "$found" | sort -V -C; then
    # New enough, or a version this script cannot read (TLS first, a slow greeting): use it;
    # `touchledger serve` checks the version itself and names it if it is too old.
    echo "using the NATS server at $URL${found:+ (nats-server $found)}"
    start_own=0
  else
    case "$HOST" in
      127.*|localhost|::1) ;;
      *)
        echo "the NATS server at $HOST:$PORT is $found; touchledger needs $MIN or newer: upgrade it, or unset TOUCHLEDGER_NATS_URL to run a local one" >&2
        exit 1 ;;
    esac
    # A local server too old for the ledger (e.g. Debian's 2.9): leave it alone and start a
    # current one on the next free port.
    echo "the NATS server at $HOST:$PORT is $found; touchledger needs $MIN or newer: starting a current one beside it" >&2
    while reachable; do PORT=$((PORT + 1)); done
    URL="nats://$HOST:$PORT"
  fi
fi
if [ "$start_own" = 1 ]; then
  SERVER="$(bash deploy/ensure-nats-server.sh)"
  mkdir -p ./data/nats
  echo "starting $SERVER with JetStream on $HOST:$PORT (data in ./data/nats)"
  "$SERVER" -c deploy/nats/single.conf -a "$HOST" -p "$PORT" -sd ./data/nats -l ./data/nats/server.log &
  NATS_PID=$!
  trap '[ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do reachable && break; sleep 0.1; done
  reachable || { echo "nats-server did not start; see ./data/nats/server.log" >&2; exit 1; }
fi

export TOUCHLEDGER_NATS_URL="$URL"
export TOUCHLEDGER_HTTP_ADDR="${TOUCHLEDGER_HTTP_ADDR:-127.0.0.1:8080}"
echo "touchledger serve: data $TOUCHLEDGER_DATA, NATS $URL (Ctrl-C to stop)"
"$BIN" serve &
SERVE_PID=$!
DEMO_PID=""
stop() {
  [ -n "$DEMO_PID" ] && kill "$DEMO_PID" 2>/dev/null || true
  kill -TERM "$SERVE_PID" 2>/dev/null || true
  wait "$SERVE_PID" 2>/dev/null || true
  [ -n "$NATS_PID" ] && kill "$NATS_PID" 2>/dev/null || true
}
trap stop INT TERM EXIT
for _ in $(seq 1 300); do
  (exec 3<>"/dev/tcp/${TOUCHLEDGER_HTTP_ADDR%:*}/${TOUCHLEDGER_HTTP_ADDR##*:}") 2>/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "touchledger serve exited; see the messages above" >&2; exit 1; }
  sleep 0.1
done
if [ "${TOUCHLEDGER_DEMO:-1}" != "0" ]; then
  "$BIN" demo --rate "${TOUCHLEDGER_DEMO_RATE:-1}" &
  DEMO_PID=$!
fi
echo
echo "dashboard: http://$TOUCHLEDGER_HTTP_ADDR/"
echo
wait "$SERVE_PID"
