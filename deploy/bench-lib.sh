# Shared by the partition benchmarks (sourced, not run): a temp directory and the processes
# started into PIDS, both removed on exit; free loopback ports; the machine line.
TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576) " GiB"}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# start_nats DIR: a JetStream nats-server ($SERVER) on a free port (NPORT), in DIR.
start_nats() {
  NPORT="$(free_port)"
  "$SERVER" -a 127.0.0.1 -p "$NPORT" -js -sd "$1" -l "$1.log" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break; sleep 0.1; done
}
