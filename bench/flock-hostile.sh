#!/usr/bin/env bash
# Benchmark of the flock port under attack (issue 15, item 6): a flock of three real `crux agent`
# processes on loopback; 10^6 hostile datagrams (random, truncated, bit-flipped, replayed sealed
# datagrams and join requests recorded earlier, other bloc, wrong key, unknown epoch, oversized,
# junk handshakes) and hostile stream frames over TCP, sent to one agent from addresses outside
# the flock's address space. Prints the datagrams sent per kind, the replies received, the
# agent's drop counters, its RSS (VmRSS) before and after, and whether the flock still agrees.
#
# Usage: bench/flock-hostile.sh [ARGS]   (ARGS go to flock-hostile-bench: --datagrams N,
#        --frames N, --preset NAME, --seed N, --crux PATH)
# Builds target/release/{crux,flock-hostile-bench}. Loopback only (127.A.B.x, a port found free);
# kills only the agents it started. Figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p crux-agent -p crux-bench-flock-hostile
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
exec target/release/flock-hostile-bench "$@"
