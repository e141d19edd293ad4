#!/usr/bin/env bash
# What the free-space check (one statvfs per commit, ADR 0007) costs on the append path:
# `touchledger append --batch 1000` of the same generated file into fresh directories, with the
# default reserve and with the check switched off (--reserve-mib 0 --reserve-percent 0),
# alternating, ROUNDS times each. Release build. Prints events/s per run.
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-200000}"
ROUNDS="${ROUNDS:-3}"
DIR="${DIR:-$(mktemp -d)}"
cargo build --release -q -p touchledger-cli
T=target/release/touchledger
[ -f "$DIR/events.jsonl" ] || "$T" generate --out "$DIR/events.jsonl" --events "$EVENTS" >/dev/null
run() {
  rm -rf "$DIR/ledger"
  local start end
  start=$(date +%s.%N)
  "$T" append --data "$DIR/ledger" --file "$DIR/events.jsonl" --batch 1000 "$@" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$EVENTS/($end-$start):,.0f}')"
}
for r in $(seq "$ROUNDS"); do
  echo "round $r: reserve on  $(run) events/s"
  echo "round $r: reserve off $(run --reserve-mib 0 --reserve-percent 0) events/s"
done
rm -rf "$DIR/ledger"
