#!/usr/bin/env bash
# The durable store (issue 7) on five real `crux agent` processes on loopback (release build):
# document-write latency (p50/p99/max) and rate through a node that is not the Raft leader, with
# one writer and with 16, and the time from the Raft leader's kill -9 to the first successful
# write. Figures only. Kills only the agents it started.
# Usage: bench/store.sh [--writes N] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p crux-agent -p crux-bench-store
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
exec target/release/crux-bench-store --crux target/release/crux "$@"
