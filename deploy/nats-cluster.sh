#!/usr/bin/env bash
# A 3-node NATS JetStream cluster on this machine for a partitioned, replicated ledger
# (deploy/nats/cluster/n1-n3.conf: client ports 4301-4303, routes 6301-6303, sync_interval
# always), with each node's store in ./data/nats-cluster/n<i> and its log beside it. Uses the
# nats-server deploy/ensure-nats-server.sh finds or installs. Prints the URL list for
# `touchledger serve --nats-url`, then runs until Ctrl-C, which stops the three nodes.
#
#   bash deploy/nats-cluster.sh &
#   touchledger serve --nats-url nats://127.0.0.1:4301,nats://127.0.0.1:4302,nats://127.0.0.1:4303 \
#     --partitions 8 --own auto --replicas 3 --data ./data/ledger-a
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER="$(bash deploy/ensure-nats-server.sh)"
DATA="${TOUCHLEDGER_NATS_CLUSTER_DATA:-./data/nats-cluster}"
mkdir -p "$DATA"
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM
for i in 1 2 3; do
  if (exec 3<>"/dev/tcp/127.0.0.1/430$i") 2>/dev/null; then
    echo "port 430$i is in use: is the cluster already running?" >&2
    exit 1
  fi
  "$SERVER" -c "deploy/nats/cluster/n$i.conf" -sd "$DATA/n$i" -l "$DATA/n$i.log" &
  pids+=("$!")
done
for i in 1 2 3; do
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/430$i") 2>/dev/null && break
    if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
      echo "node $i did not start; its log: $DATA/n$i.log" >&2
      tail -20 "$DATA/n$i.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
done
echo "NATS cluster up (JetStream elects its leader within seconds): nats://127.0.0.1:4301,nats://127.0.0.1:4302,nats://127.0.0.1:4303"
wait
