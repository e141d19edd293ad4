#!/usr/bin/env bash
# Dashboard reads of a partitioned ledger against the same ledger unpartitioned, same run
# (issue #11). The CDNOW master (23,570 customers, 69,659 purchases) is published over NATS into
#   1. an unpartitioned `serve`, then
#   2. a ledger of PARTITIONS (default 8) partitions served by two processes (half each),
# the BG/NBD model is fitted at 1997-09-30 through `fit --remote` in both, and the same reads
# are measured with wrk through the HTTP API (for the partitioned ledger, through the process
# that does NOT own the customer's partition). Not run in CI. Installs wrk if missing.
# Env: DURATION (wrk, default 10s), CONNECTIONS (default 8), PARTITIONS (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-8}"
PARTITIONS="${PARTITIONS:-8}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
SERVER="$(bash deploy/ensure-nats-server.sh)"
# shellcheck source=deploy/bench-lib.sh
source deploy/bench-lib.sh

# The events, as a publisher would send them.
FILE="${FILE:-../shared/data/cdnow/CDNOW_master.txt}"
"$BIN" import cdnow --data "$TMP/source" --file "$FILE" >/dev/null
"$BIN" replay --data "$TMP/source" --format jsonl |
  python3 -c 'import json, sys
for line in sys.stdin: print(json.dumps(json.loads(line)["event"]))' >"$TMP/events.jsonl"
echo "events: $(wc -l <"$TMP/events.jsonl")"

wait_ready() { # port
  until curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; do sleep 0.5; done
}
run() { # name url
  echo "--- $1: $2"
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s --latency "$2" | grep -E "Requests/sec|50%|99%|requests in|Non-2xx|timeout" || true
}
measure() { # base customer
  run "customer 360, now" "$1/api/v1/customers/$2"
  run "at-risk sort=score, now" "$1/api/v1/at-risk?per_page=50&sort=score"
  run "at-risk sort=value, now" "$1/api/v1/at-risk?per_page=50&sort=value"
  run "overview, now" "$1/api/v1/overview"
  run "customer 360 at 1998-06-30" "$1/api/v1/customers/$2?as_of=1998-06-30"
}
# A customer the partitioned ledger's first process does not own (any customer for P = 1).
CUSTOMER="${CUSTOMER:-cdnow-4}"

echo "== unpartitioned"
start_nats "$TMP/nats1"
HPORT="$(free_port)"
"$BIN" serve --data "$TMP/single" --nats-url "nats://127.0.0.1:$NPORT" --http-addr "127.0.0.1:$HPORT" >"$TMP/single.log" 2>&1 &
SERVE=$!; PIDS+=($SERVE)
until curl -sf "http://127.0.0.1:$HPORT/healthz" >/dev/null; do sleep 0.2; done
/usr/bin/time -f "publish: %e s" "$BIN" publish --nats-url "nats://127.0.0.1:$NPORT" --file "$TMP/events.jsonl" | grep -E "acked|rejected"
"$BIN" fit --remote --nats-url "nats://127.0.0.1:$NPORT" --as-of 1997-09-30 --unit weeks | tail -1
sleep 3; wait_ready "$HPORT"
measure "http://127.0.0.1:$HPORT" "$CUSTOMER"
kill "$SERVE"; wait "$SERVE" 2>/dev/null || true

echo "== $PARTITIONS partitions, two processes"
start_nats "$TMP/nats2"
HALF=$((PARTITIONS / 2))
H1="$(free_port)"; H2="$(free_port)"
"$BIN" serve --data "$TMP/parts" --partitions "$PARTITIONS" --own "0-$((HALF - 1))" --nats-url "nats://127.0.0.1:$NPORT" \
  --http-addr "127.0.0.1:$H1" >"$TMP/p1.log" 2>&1 &
PIDS+=($!)
"$BIN" serve --data "$TMP/parts" --partitions "$PARTITIONS" --own "$HALF-$((PARTITIONS - 1))" --nats-url "nats://127.0.0.1:$NPORT" \
  --http-addr "127.0.0.1:$H2" >"$TMP/p2.log" 2>&1 &
PIDS+=($!)
until curl -sf "http://127.0.0.1:$H1/healthz" >/dev/null && curl -sf "http://127.0.0.1:$H2/healthz" >/dev/null; do sleep 0.2; done
sleep 2
/usr/bin/time -f "publish: %e s" "$BIN" publish --nats-url "nats://127.0.0.1:$NPORT" --file "$TMP/events.jsonl" | grep -E "acked|rejected"
"$BIN" fit --remote --nats-url "nats://127.0.0.1:$NPORT" --as-of 1997-09-30 --unit weeks | tail -1
sleep 3; wait_ready "$H1"; wait_ready "$H2"
# Through the process that does not own the customer's partition.
P="$(curl -s -D - -o /dev/null "http://127.0.0.1:$H1/api/v1/customers/$CUSTOMER" | awk -F': ' 'tolower($1)=="x-touchledger-partition" {print int($2)}')"
if [ "$P" -lt "$HALF" ]; then VIA="$H2"; else VIA="$H1"; fi
echo "customer $CUSTOMER is in partition $P; asking the other process"
measure "http://127.0.0.1:$VIA" "$CUSTOMER"
