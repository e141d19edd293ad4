#!/usr/bin/env bash
# Failover time of a grown partition (issue #12). A ledger of 2 partitions is served by process
# A (`--own all`) with process B as the standby of both (`--own all`, its own empty data
# directory, as on another machine). EVENTS (default 2,000,000: about 1M per partition) generated
# touchpoints are published over NATS; once A has stored them all, A is SIGKILLed and the script
# times, from the kill:
#   * owned: B holds both leases and has rebuilt both stores from the partitions' feed streams
#     (every hash and the chain checked), so its intake runs (B's /readyz lists both);
#   * ready: B's read models have folded both partitions' logs (B's /readyz answers 200).
# Then B is stopped and its stores verified. Not run in CI.
# Env: EVENTS, LEASE_TTL (seconds, default 10), CUSTOMERS (default 50000).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS="${EVENTS:-2000000}"
LEASE_TTL="${LEASE_TTL:-10}"
CUSTOMERS="${CUSTOMERS:-50000}"
cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
SERVER="$(bash deploy/ensure-nats-server.sh)"
# shellcheck source=deploy/bench-lib.sh
source deploy/bench-lib.sh

"$BIN" generate --out "$TMP/events.jsonl" --events "$EVENTS" --customers "$CUSTOMERS" --duplicates 0 --conflicts 0 --invalid 0 >/dev/null
echo "events: $(wc -l <"$TMP/events.jsonl") ($(du -h "$TMP/events.jsonl" | cut -f1))"

start_nats "$TMP/nats"
URL="nats://127.0.0.1:$NPORT"
HA="$(free_port)"; HB="$(free_port)"
"$BIN" serve --data "$TMP/a" --partitions 2 --own all --lease-ttl-secs "$LEASE_TTL" --nats-url "$URL" \
  --http-addr "127.0.0.1:$HA" >"$TMP/a.log" 2>&1 &
A=$!; PIDS+=($A)
until curl -sf "http://127.0.0.1:$HA/readyz" | grep -q '"1"'; do sleep 0.2; done
"$BIN" serve --data "$TMP/b" --partitions 2 --own all --nats-url "$URL" \
  --http-addr "127.0.0.1:$HB" >"$TMP/b.log" 2>&1 &
B=$!; PIDS+=($B)

T0=$(date +%s.%N)
"$BIN" publish --nats-url "$URL" --file "$TMP/events.jsonl" --in-flight 1000 | grep -E "acked|rejected"
# A has stored everything: nothing pending or unacknowledged in either partition's intake.
stored() {
  "$BIN" cluster status --nats-url "$URL" --partitions 2 --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
ok = all(p["intake_pending"] == 0 and p["intake_unacked"] == 0 for p in s["partitions"])
print(" ".join(str(p["feed_head"]) for p in s["partitions"]) if ok else "")'
}
until [ -n "$(stored)" ]; do sleep 1; done
echo "published and stored by A in $(echo "$(date +%s.%N) - $T0" | bc) s; feed heads: $(stored)"
until curl -sf "http://127.0.0.1:$HA/readyz" >/dev/null; do sleep 1; done
echo "A ready after $(echo "$(date +%s.%N) - $T0" | bc) s"

kill -9 "$A"
K=$(date +%s.%N)
echo "== A SIGKILLed; B takes over (lease TTL $LEASE_TTL s)"
OWNED=""
while :; do
  body="$(curl -s "http://127.0.0.1:$HB/readyz" || true)"
  if [ -z "$OWNED" ] && echo "$body" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if sorted(d["owned"]) == ["0","1"] else 1)' 2>/dev/null; then
    OWNED=$(echo "$(date +%s.%N) - $K" | bc)
    echo "owned (both stores rebuilt from the feed, intake running) after $OWNED s"
  fi
  # (A process that owns nothing only routes reads and is ready: wait for the takeover first.)
  if [ -n "$OWNED" ] && curl -sf "http://127.0.0.1:$HB/readyz" >/dev/null; then
    echo "ready (read models folded) after $(echo "$(date +%s.%N) - $K" | bc) s"
    break
  fi
  sleep 0.2
done
grep -E "restored|caught up from the feed|projections caught up" "$TMP/b.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 || true
kill "$B"; wait "$B" 2>/dev/null || true
"$BIN" verify --data "$TMP/b" --partitions 2 | tail -3
