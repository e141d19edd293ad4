#!/usr/bin/env bash
# Dashboard reads under load (issue #10). Grows a store, runs `touchledger serve` on it against a
# private nats-server on a free port, times the full catch-up (projections + current views,
# until /readyz), samples serve's RSS, and measures with wrk, in the same run:
#   * "now" reads (ranks and at-risk pages from the current materialisation's indexes), and
#   * the same reads with an explicit as_of (the full pass of ADR 0004): the baseline; at scale
#     a single timed request (it takes seconds).
# Not run in CI. Installs wrk from Debian's packages if missing.
#
# Datasets (DATASET=...):
#   cdnow (default)  the CDNOW master (23,570 customers, 69,659 purchases) + a BG/NBD fit
#   demo             the demo simulation written straight into the store:
#                    CUSTOMERS (default 1000000) over DAYS (default 640) → about 10 M events
# Env: DURATION (wrk, default 10s), CONNECTIONS (default 8), DIR (reuse/keep this data
# directory instead of a temp one: the store is grown only if DIR has none), LIVE_RATE
# (touchpoints/s published during the "live" runs, default 20; 0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET="${DATASET:-cdnow}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-8}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
SERVER="$(bash deploy/ensure-nats-server.sh)"
TMP="$(mktemp -d)"
DATA="${DIR:-$TMP/ledger}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NPORT="$(free_port)"; HPORT="$(free_port)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576) " GiB"}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

if [ -e "$DATA/db" ] || [ -e "$DATA/conf" ]; then
  echo "== reusing the store in $DATA"
elif [ "$DATASET" = cdnow ]; then
  FILE="${FILE:-../shared/data/cdnow/CDNOW_master.txt}"
  echo "== import $FILE and fit"
  /usr/bin/time -f "import: %e s, max RSS %M KiB" "$BIN" import cdnow --data "$DATA" --file "$FILE" >/dev/null
  "$BIN" fit --data "$DATA" --as-of 1997-09-30 --unit weeks >/dev/null
else
  echo "== demo history: ${CUSTOMERS:-1000000} customers over ${DAYS:-640} days"
  /usr/bin/time -f "grow: %e s, max RSS %M KiB" "$BIN" demo --data "$DATA" \
    --customers "${CUSTOMERS:-1000000}" --history-days "${DAYS:-640}" --rate 0
  /usr/bin/time -f "fit: %e s, max RSS %M KiB" "$BIN" fit --data "$DATA" --as-of "$(date -u +%Y-%m-%d)" --unit weeks | tail -1
fi
"$BIN" stats --data "$DATA" | head -5

"$SERVER" -a 127.0.0.1 -p "$NPORT" -js -sd "$TMP/nats" -l "$TMP/nats.log" &
PIDS+=($!)
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break; sleep 0.1; done

START=$(date +%s.%N)
TOUCHLEDGER_LOG="${TOUCHLEDGER_LOG:-info}" "$BIN" serve --data "$DATA" --nats-url "nats://127.0.0.1:$NPORT" \
  --http-addr "127.0.0.1:$HPORT" >"$TMP/serve.log" 2>&1 &
SERVE=$!
PIDS+=($SERVE)
rss() { awk '/VmRSS/ {print $2}' "/proc/$SERVE/status"; }
MAXRSS=0
until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do
  kill -0 "$SERVE" || { tail -20 "$TMP/serve.log"; exit 1; }
  r=$(rss); [ "${r:-0}" -gt "$MAXRSS" ] && MAXRSS=$r
  sleep 1
done
echo "serve ready after $(echo "$(date +%s.%N) - $START" | bc) s (projections and current views caught up); max RSS during the catch-up $MAXRSS KiB"
curl -s "http://127.0.0.1:$HPORT/readyz"; echo
grep -E "catch-up done|current views ready|current views opened" "$TMP/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 || true

# A fresh nats-server gets the whole log on the committed-event feed first: wait for it, so
# that wrk does not share the two cores with the feed's catch-up.
HEAD="$(curl -s "http://127.0.0.1:$HPORT/readyz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')"
until [ "$(curl -s "http://127.0.0.1:$HPORT/metrics" | awk '/^touchledger_feed_published_position/ {print int($2)}')" -ge "$HEAD" ] 2>/dev/null; do sleep 2; done
echo "feed caught up (position $HEAD) after $(echo "$(date +%s.%N) - $START" | bc) s"

NOW="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
B="http://127.0.0.1:$HPORT"
CUSTOMER="$(curl -s "$B/api/v1/at-risk?per_page=1&sort=value" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["customer_id"])')"
MAXRSS=0
run() { # name url
  echo "--- $1: $2"
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --timeout 10s --latency "$2" | grep -E "Latency|Requests/sec|50%|99%|requests in|Non-2xx|timeout" &
  local w=$!
  while kill -0 "$w" 2>/dev/null; do r=$(rss); [ "${r:-0}" -gt "$MAXRSS" ] && MAXRSS=$r; sleep 0.5; done
  wait "$w" || true
}
once() { # name url: one request, timed
  echo "--- $1 (one request): $(curl -s -o /dev/null -w '%{http_code} in %{time_total} s' --max-time 600 "$2")"
}
run "customer 360, now (ranks from indexes)" "$B/api/v1/customers/$CUSTOMER"
for sort in score value since customer level; do
  run "at-risk sort=$sort, now (index)" "$B/api/v1/at-risk?per_page=50&sort=$sort"
done
run "at-risk cause=disappointment, now (index, filtered)" "$B/api/v1/at-risk?per_page=50&cause=disappointment"
run "overview, now (sums kept by difference)" "$B/api/v1/overview"
echo "serve max RSS during the index runs: $MAXRSS KiB"
# The same reads while touchpoints arrive: every touchpoint changes a customer's current view,
# so nothing can be served from a result memoised before it.
LIVE_RATE="${LIVE_RATE:-20}"
if [ "$LIVE_RATE" != 0 ]; then
  echo "== while $LIVE_RATE touchpoints/s arrive (demo's live tail over NATS)"
  # 1,000 simulated customers (their ids are the store's first thousand demo customers): the
  # demo first backfills their events of today, then publishes at LIVE_RATE.
  "$BIN" demo --nats-url "nats://127.0.0.1:$NPORT" --customers 1000 --seed 7 \
    --history-days 0 --rate "$LIVE_RATE" >"$TMP/live.log" 2>&1 &
  LIVE=$!
  PIDS+=($LIVE)
  until grep -q backfilled "$TMP/live.log"; do
    kill -0 "$LIVE" || { tail -5 "$TMP/live.log"; exit 1; }
    sleep 0.2
  done
  sleep 2
  BEFORE="$(curl -s "$B/readyz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')"
  T0=$(date +%s.%N)
  run "overview, now, live" "$B/api/v1/overview"
  run "customer 360, now, live" "$B/api/v1/customers/$CUSTOMER"
  run "at-risk sort=score, now, live" "$B/api/v1/at-risk?per_page=50&sort=score"
  kill "$LIVE" 2>/dev/null || true
  AFTER="$(curl -s "$B/readyz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["head"])')"
  echo "events appended during the live runs: $((AFTER - BEFORE)) in $(echo "$(date +%s.%N) - $T0" | bc) s"
fi
MONTH_END="$(date -u +%Y-%m-01)"
once "overview at the month end $MONTH_END (snapshot: first read)" "$B/api/v1/overview?as_of=$MONTH_END"
run "overview at the month end $MONTH_END (snapshot)" "$B/api/v1/overview?as_of=$MONTH_END"
once "customer 360, as_of (full pass)" "$B/api/v1/customers/$CUSTOMER?as_of=$NOW"
once "at-risk sort=score, as_of (full pass)" "$B/api/v1/at-risk?per_page=50&sort=score&as_of=$NOW"
once "overview, as_of (full pass)" "$B/api/v1/overview?as_of=$NOW"
if [ "$DATASET" = cdnow ]; then
  run "customer 360, as_of (full pass)" "$B/api/v1/customers/$CUSTOMER?as_of=$NOW"
  run "at-risk sort=score, as_of (full pass)" "$B/api/v1/at-risk?per_page=50&sort=score&as_of=$NOW"
  run "overview, as_of (full pass)" "$B/api/v1/overview?as_of=$NOW"
fi
echo "serve RSS at the end: $(rss) KiB"
