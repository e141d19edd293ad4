#!/usr/bin/env bash
# Serve's memory on an existing data directory (issue #10): restart `touchledger serve` on DIR
# against a private nats-server once per cache size, and report the time to /readyz and the
# resident set size then and 20 s later (RSS from /proc). With the same data directory the
# runs differ only in sled's cache capacity. Also reports `touchledger stats` (no index, no
# service) with the smallest cache: sled's own memory on that store. Not run in CI.
# Env: DIR (required), CACHES (MiB, default "256 32").
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DIR:?DIR=<data directory> is required}"
CACHES="${CACHES:-256 32}"
cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
SERVER="$(bash deploy/ensure-nats-server.sh)"
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576) " GiB"}' /proc/meminfo); store: $(du -sh "$DIR" | cut -f1)"
for cache in $CACHES; do
  NPORT="$(free_port)"; HPORT="$(free_port)"
  rm -rf "$TMP/nats"
  "$SERVER" -a 127.0.0.1 -p "$NPORT" -js -sd "$TMP/nats" -l "$TMP/nats.log" &
  NATS=$!
  PIDS+=("$NATS")
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break; sleep 0.1; done
  START=$(date +%s.%N)
  "$BIN" serve --data "$DIR" --nats-url "nats://127.0.0.1:$NPORT" --http-addr "127.0.0.1:$HPORT" \
    --cache-mib "$cache" >"$TMP/serve-$cache.log" 2>&1 &
  SERVE=$!
  PIDS+=("$SERVE")
  until curl -sf "http://127.0.0.1:$HPORT/readyz" >/dev/null; do
    kill -0 "$SERVE" || { tail -20 "$TMP/serve-$cache.log"; exit 1; }
    sleep 0.5
  done
  echo "serve --cache-mib $cache: /readyz after $(echo "$(date +%s.%N) - $START" | bc) s, RSS $(rss "$SERVE") KiB"
  sleep 20
  echo "  20 s later: RSS $(rss "$SERVE") KiB"
  kill "$SERVE"; wait "$SERVE" || true
  kill "$NATS"; wait "$NATS" 2>/dev/null || true
done
smallest="$(echo "$CACHES" | tr ' ' '\n' | sort -n | head -1)"
/usr/bin/time -f "stats --cache-mib $smallest: %e s, max RSS %M KiB" "$BIN" stats --data "$DIR" --cache-mib "$smallest" >/dev/null
