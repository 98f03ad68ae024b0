#!/usr/bin/env bash
# DNS benchmark (issue 25, item 3): `dnsperf` (Debian package dnsperf, installed by dev/setup.sh)
# against one agent with 1,000 registered instances (100 apis × 10), A and SRV questions:
# queries per second at full speed and at a fixed rate, latency p50/p99 under that load (a
# prober in the benchmark process; dnsperf 2.10 prints only the mean), and the agent's CPU per
# 10k queries a second. README "DNS" puts the figures beside Consul's and CoreDNS's.
#
# Usage: bench/dns.sh            Env: DNS_ARGS (see target/release/registry-bench dns --help),
#                                e.g. DNS_ARGS="--secs 5 --rates 10000,30000".
# Builds target/release/{crux,registry-bench}. Loopback only; stops only the agent it started.
# Figures are printed, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dnsperf >/dev/null 2>&1; then
    echo "bench/dns.sh: no dnsperf (Debian package dnsperf): run dev/setup.sh as root" >&2
    exit 1
fi
cargo build --release -q -p crux-agent -p crux-bench-registry
unset $(env | grep -o '^CRUX_[A-Z_]*' || true)
echo "== registry-bench dns"
# shellcheck disable=SC2086
target/release/registry-bench dns ${DNS_ARGS:-}
