#!/usr/bin/env bash
# Test set-up: installs the real components the tests run, each where its toolchain exists: the
# Debian tools (system_tools below), cargo-deb, and the gRPC clients of the conformance test
# (issue 24), those into this checkout only:
#   * Python: grpcio, grpcio-tools, grpcio-reflection, dnspython and xds-protos (the xDS test,
#     agent/tests/xds.rs) from PyPI into .dev/venv
#     (examples/python/requirements.txt);
#   * Node: @grpc/grpc-js, @grpc/proto-loader from npm into examples/node/node_modules;
#   * Debian's chromium, the headless browser the live page's test (agent/tests/ui.rs) drives.
# Idempotent and quick once done: each part is skipped while its stamp matches its requirements.
# A missing toolchain or a failed install is said loudly and is not fatal: the test then says it
# skips that client.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .dev

python_clients() {
    local req=examples/python/requirements.txt stamp=.dev/venv/.crux-requirements
    if ! command -v python3 >/dev/null 2>&1; then
        echo "dev/setup.sh: SKIPPED Python clients: no python3 on PATH"
        return
    fi
    if [ -f "$stamp" ] && cmp -s "$req" "$stamp" && [ -x .dev/venv/bin/python ]; then
        echo "dev/setup.sh: Python clients present (.dev/venv)"
        return
    fi
    echo "dev/setup.sh: installing Python clients into .dev/venv ($req)"
    if python3 -m venv .dev/venv &&
        .dev/venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"; then
        cp "$req" "$stamp"
    else
        echo "dev/setup.sh: FAILED to install the Python clients: the conformance test will skip them"
    fi
}

node_clients() {
    local pkg=examples/node/package.json stamp=examples/node/node_modules/.crux-package.json
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "dev/setup.sh: SKIPPED Node clients: no node and npm on PATH"
        return
    fi
    if [ -f "$stamp" ] && cmp -s "$pkg" "$stamp"; then
        echo "dev/setup.sh: Node clients present (examples/node/node_modules)"
        return
    fi
    echo "dev/setup.sh: installing Node clients into examples/node/node_modules ($pkg)"
    if npm install --prefix examples/node --no-audit --no-fund --loglevel=error; then
        cp "$pkg" "$stamp"
    else
        echo "dev/setup.sh: FAILED to install the Node clients: the conformance test will skip them"
    fi
}

# The toolchains themselves, from Debian, where this runs as root with apt-get (CI does): python3
# with venv, node and npm, chromium (the live page's test), systemd-nspawn (the .deb's test boots
# a throwaway system with it), dig (dnsutils: the DNS test), nats-server (Catalyst's NATS
# pass-through test, agent/tests/catalyst.rs) and dnsperf (bench/dns.sh). Elsewhere a missing one
# is said and its tests skipped.
system_tools() {
    local missing=()
    command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null ||
        missing+=(python3 python3-venv)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
    command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
    command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
    command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "dev/setup.sh: cannot install ${missing[*]} (not root, or no apt-get)"
        return
    fi
    echo "dev/setup.sh: installing ${missing[*]} from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" ||
        echo "dev/setup.sh: FAILED to install ${missing[*]}"
}

# cargo-deb, which builds the .deb (dist/deb.sh). A debug build: it installs in about a minute
# instead of four, and packs the test's package (quick compression) as fast.
cargo_deb() {
    if cargo deb --version >/dev/null 2>&1; then
        echo "dev/setup.sh: cargo-deb present"
        return
    fi
    echo "dev/setup.sh: installing cargo-deb (cargo install --debug)"
    cargo install --quiet --locked --debug cargo-deb --version '^2' ||
        echo "dev/setup.sh: FAILED to install cargo-deb: the .deb test will skip"
}

system_tools
python_clients
node_clients
cargo_deb
