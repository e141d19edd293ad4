#!/usr/bin/env bash
# Browser tests of the dashboard (part of deploy/test.sh): starts a private nats-server (free
# port, temp dir) and `touchledger serve` on a temp data directory, publishes seeded demo
# traffic, then drives headless Chromium with playwright-core (tests/browser/dashboard.mjs); then
# grows a store of 100,000 demo customers and checks that its pages load within a second
# (tests/browser/scale.mjs).
# Installs Debian's chromium and the npm package when missing. Screenshots are kept in
# target/browser-artefacts/.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v chromium >/dev/null 2>&1; then
  echo "chromium not found; installing Debian's chromium package" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
fi
if ! command -v curl >/dev/null 2>&1; then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl >&2
fi
if ! command -v node >/dev/null 2>&1; then
  echo "node not found; installing Debian's nodejs and npm packages" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >&2
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >&2)

nats_server="${TOUCHLEDGER_NATS_SERVER:-$(bash deploy/ensure-nats-server.sh)}"
cargo build -p touchledger-cli --locked -q
bin="$root/target/debug/touchledger"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
nats_port="$(free_port)"
http_port="$(free_port)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$nats_server" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
nats_url="nats://127.0.0.1:$nats_port"
"$bin" serve --data "$work/ledger" --nats-url "$nats_url" --http-addr "127.0.0.1:$http_port" \
  --sweep-secs 1 --refit-hours 0 >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
base="http://127.0.0.1:$http_port"
for _ in $(seq 1 200); do
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin" demo --nats-url "$nats_url" --customers 80 --history-days 150 --rate 0 --seed 7
# Wait until the projections have folded everything the demo published.
for _ in $(seq 1 300); do
  ready="$(curl -fsS "$base/readyz" 2>/dev/null || true)"
  case "$ready" in *'"lag":0'*) break ;; esac
  sleep 0.1
done
artefacts="$root/target/browser-artefacts"
if ! node tests/browser/dashboard.mjs "$base" "$nats_url" "$artefacts" "$bin"; then
  echo "--- serve.log (tail)" >&2
  tail -n 40 "$work/serve.log" >&2
  exit 1
fi

# The dashboard's numbers are `touchledger query`'s: the API's overview at a fixed instant equals
# the CLI's population JSON at that instant, on the same data directory once serve has stopped.
asof="$(date -u +%Y-%m-%d)"
curl -fsS "$base/api/v1/overview?as_of=$asof" >"$work/api.json"
kill -TERM "$serve_pid"
wait "$serve_pid" || true
"$bin" query --data "$work/ledger" --as-of "$asof" --json >"$work/cli.json"
node -e '
  const fs = require("fs"), assert = require("assert");
  const [a, b] = process.argv.slice(1).map(f => JSON.parse(fs.readFileSync(f, "utf8")));
  assert.deepStrictEqual(a, b);
  console.log(`dashboard API overview == touchledger query (customers ${a.customers}, NPS ${a.nps})`);
' "$work/api.json" "$work/cli.json"

# A ledger in DATA served by its own serve on its own nats-server (NAME names the logs), waited
# for until ready (projections folded, every current view materialised) for up to LIMIT s;
# sets served_base and served_log.
serve_ledger() {
  local name="$1" data="$2" limit="$3" nport hport pid started
  nport="$(free_port)"
  hport="$(free_port)"
  "$nats_server" -js -a 127.0.0.1 -p "$nport" -sd "$work/nats-$name" >"$work/nats-$name.log" 2>&1 &
  pids+=($!)
  served_log="$work/serve-$name.log"
  "$bin" serve --data "$data" --nats-url "nats://127.0.0.1:$nport" \
    --http-addr "127.0.0.1:$hport" --refit-hours 0 >"$served_log" 2>&1 &
  pid=$!
  pids+=("$pid")
  served_base="http://127.0.0.1:$hport"
  started=$SECONDS
  until curl -fsS "$served_base/readyz" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { tail -n 40 "$served_log" >&2; exit 1; }
    [ $((SECONDS - started)) -lt "$limit" ] || { echo "serve ($name) did not become ready" >&2; tail -n 20 "$served_log" >&2; exit 1; }
    sleep 0.5
  done
  echo "$name store ready after $((SECONDS - started)) s"
}

# At scale (issue 10): a store of 100,000 demo customers grown through the append path (no
# NATS), served by a second serve on its own nats-server; the overview and a customer page must
# each load within a second.
scale_customers="${TOUCHLEDGER_SCALE_CUSTOMERS:-100000}"
"$bin" demo --data "$work/big" --customers "$scale_customers" --history-days 120 --rate 0
serve_ledger scale "$work/big" 1200
if ! node tests/browser/scale.mjs "$served_base" "$artefacts" "$scale_customers"; then
  tail -n 40 "$served_log" >&2
  exit 1
fi

# The Models page (issue 13) on real data: the CDNOW sample imported into its own ledger.
"$bin" import cdnow --data "$work/cdnow" --file tests/data/cdnow/CDNOW_sample.txt >/dev/null
# A recorded fit (BG/NBD with Gamma-Gamma) gives the customer pages their CLV.
"$bin" fit --data "$work/cdnow" --as-of 1997-09-30 --unit weeks >/dev/null
serve_ledger cdnow "$work/cdnow" 300
if ! node tests/browser/models.mjs "$served_base" "$artefacts"; then
  tail -n 40 "$served_log" >&2
  exit 1
fi
