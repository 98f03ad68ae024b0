#!/usr/bin/env bash
# Benchmarks of the service registry (reeve / steward):
#   1. lookup:   local Lookups per second and p50/p99/max latency over one agent's Unix socket,
#                with C = 1, 4, 16 concurrent clients (100 heartbeating instances registered);
#                lookup-large: the same with 20,000 more instances in the registry;
#   2. capacity: instances with 1 s heartbeats one steward sustains (N = 1k, 10k, 50k, 100k on
#                R = 10-50 in-process reeves over gRPC on 127.0.0.1): CPU of the steward and of
#                the reeves, instances turning unknown, time for a registration to reach every
#                replica. Registered one reeve after another (--ramp);
#      capacity-burst: the same with every reeve registering at once (as after a failover),
#                N = 10k, 50k;
#   3. watch:    time for a registration / deregistration to reach a Watch on every node of a
#                5-node flock of real agents (20 changes each way).
#
# Usage: bench/registry.sh [lookup|lookup-large|capacity|capacity-burst|watch ...] (default: all)
# Env: LOOKUP_ARGS, LOOKUP_LARGE_ARGS, CAPACITY_ARGS, CAPACITY_BURST_ARGS, WATCH_ARGS: the
#      arguments of each, replacing the defaults
#      (see target/release/registry-bench <cmd> --help), e.g. CAPACITY_ARGS="--sizes 1000,10000".
# Builds target/release/{crux,registry-bench}. Loopback only (127.0.0.1, and 127.A.B.x for the
# agents); stops only the agents it started. Figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p crux-agent -p crux-bench-registry
BIN=target/release/registry-bench
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)

benches=("$@")
[[ ${#benches[@]} -gt 0 ]] || benches=(lookup lookup-large capacity capacity-burst watch)
for b in "${benches[@]}"; do
    echo "== registry-bench $b"
    case $b in
        lookup) args=${LOOKUP_ARGS:-} ;;
        lookup-large) b=lookup args=${LOOKUP_LARGE_ARGS:---extra 20000 --clients 1,4 --secs 3} ;;
        capacity) args=${CAPACITY_ARGS:---ramp} ;;
        capacity-burst) b=capacity args=${CAPACITY_BURST_ARGS:---sizes 10000,50000} ;;
        watch) args=${WATCH_ARGS:-} ;;
        *) echo "bench/registry.sh: unknown benchmark $b (lookup, lookup-large, capacity, capacity-burst, watch)" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    "$BIN" "$b" $args
    echo
done
