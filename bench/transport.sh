#!/usr/bin/env bash
# Node-plane cost (issue 15, item 8), in one process on loopback (release build):
#   suite      the cipher suite the node plane negotiates, read from the ServerHello on the wire;
#   aead       ring's AEADs alone on one core (the ceiling);
#   bulk       4 MiB pieces over one connection: plain TCP vs one crux_transport connection
#              (MB/s, CPU s per GB per side and for the process);
#   grpc       Pastiche.Pieces over HTTP/2: cleartext vs the node plane (and with 1 MiB frames);
#   handshake  1000 connections: plain TCP connect vs TCP + TLS 1.3 + bloc proof (min/median/p99).
#
# Usage: bench/transport.sh [ARGS...]   (ARGS go to transport-bench; see --help: --only, --bulk-mib,
#        --piece-mib, --read-kib, --repeats, --handshakes)
# Figures only: nothing is asserted about speed. Starts no agents; binds 127.0.0.1 port 0 only.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p crux-bench-transport
exec target/release/transport-bench "$@"
