#!/usr/bin/env bash
# Placement (issue 8) on five real `crux agent` processes on loopback (release build) running the
# example plugin galumph: time from `crux proctor apply` to converged for 3 and 20 instances,
# time to replace instances after a node's kill -9, agent memory with 20 plugin children.
# Figures only. Kills only the agents (and plugins) it started.
# Usage: bench/placement.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p crux-agent -p galumph -p crux-bench-placement
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
exec target/release/crux-bench-placement --crux target/release/crux --galumph target/release/galumph "$@"
