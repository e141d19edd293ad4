#!/usr/bin/env bash
# Dashboard reads under load (issue #10): imports the CDNOW master into a fresh data directory,
# fits the churn model, runs `touchledger serve` against a private nats-server on a free port,
# waits for /readyz, and measures with wrk, in the same run:
#   * "now" reads (served from the current materialisation: ranks and at-risk from indexes), and
#   * the same reads with an explicit as_of = the same instant (the full pass of ADR 0004),
#     which is the baseline.
# Not run in CI. Needs wrk (installed from Debian's packages if missing).
#
# Usage: bash deploy/bench-dashboard.sh [CDNOW file] ; env: DURATION (default 10s),
# CONNECTIONS (default 8), KEEP=1 keeps the temp directory.
set -euo pipefail
cd "$(dirname "$0")/.."

FILE="${1:-../shared/data/cdnow/CDNOW_master.txt}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-8}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
SERVER="$(bash deploy/ensure-nats-server.sh)"
TMP="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NPORT="$(free_port)"; HPORT="$(free_port)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] && echo "kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT

echo "== import $FILE and fit"
/usr/bin/time -f "import: %e s, max RSS %M KiB" "$BIN" import cdnow --data "$TMP/ledger" --file "$FILE" >/dev/null
"$BIN" fit --data "$TMP/ledger" --as-of 1997-09-30 --unit weeks >/dev/null

"$SERVER" -a 127.0.0.1 -p "$NPORT" -js -sd "$TMP/nats" -l "$TMP/nats.log" &
PIDS+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break; sleep 0.1; done

START=$(date +%s.%N)
TOUCHLEDGER_LOG="${TOUCHLEDGER_LOG:-warn}" "$BIN" serve --data "$TMP/ledger" --nats-url "nats://127.0.0.1:$NPORT" \
  --http-addr "127.0.0.1:$HPORT" >"$TMP/serve.log" 2>&1 &
SERVE=$!
PIDS+=($SERVE)
until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do
  kill -0 "$SERVE" || { cat "$TMP/serve.log"; exit 1; }
  sleep 0.2
done
echo "serve ready after $(echo "$(date +%s.%N) - $START" | bc) s (projections and current views caught up)"
curl -s "http://127.0.0.1:$HPORT/readyz"; echo
rss() { awk '/VmRSS/ {print $2 " KiB"}' "/proc/$SERVE/status"; }
echo "serve RSS after catch-up: $(rss)"

NOW="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
B="http://127.0.0.1:$HPORT"
run() { # name url
  echo "--- $1: $2"
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s --latency "$2" | grep -E "Latency|Requests/sec|50%|99%|requests in|Non-2xx|timeout"
}
run "customer 360, now (ranks from indexes)" "$B/api/v1/customers/cdnow-4"
run "customer 360, as_of (full pass)" "$B/api/v1/customers/cdnow-4?as_of=$NOW"
for sort in score value since customer level; do
  run "at-risk sort=$sort, now (index)" "$B/api/v1/at-risk?per_page=50&sort=$sort"
done
run "at-risk sort=score, as_of (full pass)" "$B/api/v1/at-risk?per_page=50&sort=score&as_of=$NOW"
run "overview (full pass)" "$B/api/v1/overview"
echo "serve RSS after the wrk runs: $(rss)"
