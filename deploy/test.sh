#!/usr/bin/env bash
# The README's test command: runs every unit and integration test of the workspace.
# Integration tests use real sled directories in temp dirs (and, from the NATS service on, real
# nats-server instances the test kit starts on free ports). Nothing else needs installing yet.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
cargo test --workspace --locked "$@"
