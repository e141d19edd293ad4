#!/usr/bin/env bash
# The README's test command: runs every unit and integration test of the workspace.
# Integration tests use real sled directories in temp dirs and real nats-server processes that the
# test kit starts on free ports (never the machine's shared server); a nats-server >= 2.10 is found
# or the pinned release installed by deploy/ensure-nats-server.sh (ADR 0008). Then the browser tests of the dashboard
# (tests/browser/run.sh; screenshots in target/browser-artefacts/), and the HTTP API under
# schemathesis (tests/api/schemathesis.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
TOUCHLEDGER_NATS_SERVER="$(bash deploy/ensure-nats-server.sh)"
export TOUCHLEDGER_NATS_SERVER
cargo test --workspace --locked "$@"
# The dashboard in headless Chromium (installs chromium and playwright-core when missing).
bash tests/browser/run.sh
# The HTTP API fuzzed against its OpenAPI document (schemathesis, pinned, in a venv under target/).
bash tests/api/schemathesis.sh
