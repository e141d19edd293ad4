#!/usr/bin/env bash
# The README's main command, at this stage: build touchledger, generate a realistic sample of
# touchpoints (with re-sent duplicates, conflicts and invalid lines), append it to the embedded
# sled ledger in ./data/ledger, verify the hash chain, and show stats and the last events.
# The NATS service (`touchledger serve`) replaces this once it exists.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${TOUCHLEDGER_DATA:-./data/ledger}"
EVENTS="${EVENTS:-100000}"
SAMPLE="./data/sample.jsonl"

cargo build --release --locked -p touchledger-cli
BIN=./target/release/touchledger
mkdir -p ./data

"$BIN" generate --out "$SAMPLE" --events "$EVENTS" --duplicates $((EVENTS / 100)) \
  --conflicts $((EVENTS / 1000)) --invalid $((EVENTS / 1000))
# Exit code 4 means "finished, some input rejected" — expected for this sample.
"$BIN" append --data "$DATA" --file "$SAMPLE" || [ $? -eq 4 ]
"$BIN" verify --data "$DATA"
"$BIN" stats --data "$DATA"
echo "last 3 events:"
"$BIN" replay --data "$DATA" --from-position "$(( $("$BIN" stats --data "$DATA" --json | sed -n 's/.*"head_position": \([0-9]*\).*/\1/p') - 2 ))" 
