#!/usr/bin/env bash
# Catalyst standalone topics (issue 16, item 9) on three real `crux agent` processes on loopback
# (release build): messages/s of 256 bytes published (batched, as fast as the agents take them)
# and the end-to-end latency from the publish call to delivery to a subscriber, at full rate and
# at a paced 50,000 messages/s. Figures only. Kills only the agents it started.
# Usage: bench/catalyst.sh [--seconds S] [--batch B] [--rate MSGS_PER_S]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p crux-agent -p crux-bench-catalyst
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
exec target/release/crux-bench-catalyst --crux target/release/crux "$@"
