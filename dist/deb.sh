#!/usr/bin/env bash
# Builds the Debian package of Crux with cargo-deb (metadata in agent/Cargo.toml,
# [package.metadata.deb]): the `crux` binary, /etc/crux/crux.toml as a conffile (every field of
# examples/crux.toml, commented out), the systemd unit (dist/crux.service), the maintainer
# scripts (dist/debian/), shell completions and the .proto files of the local API.
#
#   dist/deb.sh                  release build, package in target/debian/
#   dist/deb.sh --profile dev    the debug build (what `cargo test` built; quick, for the tests)
#   dist/deb.sh --no-build ...   package the binary already built for that profile
#
# Prints the path of the .deb on its last line. Needs cargo-deb (`cargo install cargo-deb`;
# dev/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release build=1
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "dist/deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$profile" in
release) dir=release fast=() ;;
dev) dir=debug fast=(--fast) ;;
*) echo "dist/deb.sh: --profile must be release or dev, not $profile" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
    echo "dist/deb.sh: cargo-deb is not installed (cargo install cargo-deb, or dev/setup.sh)" >&2
    exit 3
fi
target=${CARGO_TARGET_DIR:-target}
[ "$build" = 1 ] && cargo build --profile "$profile" -p crux-agent --bin crux
bin="$target/$dir/crux"
[ -x "$bin" ] || { echo "dist/deb.sh: no binary at $bin (build it, or drop --no-build)" >&2; exit 3; }

# Generated assets, where agent/Cargo.toml's asset list expects them.
out=.dev/deb
rm -rf "$out" && mkdir -p "$out/completions"
{
    echo "# /etc/crux/crux.toml: the config of the Crux agent (crux.service reads it)."
    echo "# Every field below is commented out and shows an example; unset fields take their"
    echo "# defaults. To start: set \`bloc\` and \`space\`, write the bloc's key (made once with"
    echo "# \`crux keygen\`) to /var/lib/crux/keyring (mode 0600, owner crux), then"
    echo "# \`systemctl enable --now crux\`. \`crux agent --config /etc/crux/crux.toml\` names the"
    echo "# field of any error."
    echo "#"
    # Comment out every assignment, keep comments and [sections] (empty sections are valid TOML).
    sed -E 's/^([a-z_]+[[:space:]]*=)/# \1/' examples/crux.toml
} >"$out/crux.toml"
"$bin" completions bash >"$out/completions/crux.bash"
"$bin" completions zsh >"$out/completions/_crux"
"$bin" completions fish >"$out/completions/crux.fish"

# cargo-deb reads the binary from the target dir (CARGO_TARGET_DIR when set) itself; --no-build:
# built above.
cargo deb -p crux-agent --no-build --profile "$profile" "${fast[@]}" --output target/debian/ >&2
ls -t target/debian/*.deb | head -n 1
