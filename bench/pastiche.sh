#!/usr/bin/env bash
# Pastiche benchmarks (issue 6), on real `crux agent` processes on loopback (release build):
#   1. a 1 GiB pull between two agents, as a ratio to a plain TCP copy of the same file
#      (read, one loopback connection, write, fsync); median of 3 runs each;
#   2. time for 8 nodes to all hold a 256 MiB blob put on one of them (7 concurrent gets), as a
#      ratio to one single pull; and how many pieces each puller got from the putter vs the others;
#   3. SHA-256 throughput of sha2 as pastiche uses it (4 MiB pieces), and whether the CPU has SHA-NI.
#
# Usage: bench/pastiche.sh [ARGS...]    (ARGS go to pastiche-bench; see --help: --only pull,swarm,sha,
#        --pull-mib, --swarm-mib, --nodes, --repeats, --tmp DIR, --crux PATH)
# Disk: about 3x the pull size (3 GiB) at the peak, under one temp dir removed at the end (and on
# Ctrl-C); the program refuses to start with less than that + 1 GiB free. It kills only the
# agents it started. Figures only: nothing is asserted about speed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p crux-agent -p crux-bench-pastiche
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
exec target/release/pastiche-bench --crux target/release/crux "$@"
