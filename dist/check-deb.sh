#!/usr/bin/env bash
# Installs a Crux .deb in a throwaway Debian system booted under systemd, and checks it as an
# operator would meet it:
#   1. `dpkg -i`: the files, the conffile, the `crux` user, /var/lib/crux owned by it, and the
#      unit passes `systemd-analyze verify`; with no bloc configured the service is neither
#      enabled nor started;
#   2. configured (bloc, space, keyring) and postinst run again: the unit is enabled and started,
#      and systemd sees it active only after the agent's READY=1 (Type=notify); `crux status`
#      and `crux members` answer on the local socket as root;
#   3. `systemctl stop`: a clean exit (status 0); `dpkg --purge` removes it all.
#
#   dist/check-deb.sh PATH.deb
#
# The system is this machine's own root file system under a tmpfs overlay (nothing it writes
# reaches the host), booted with systemd-nspawn with a private network (only its loopback), so it
# needs root and systemd-nspawn (Debian systemd-container; dev/setup.sh installs it). Without
# them it says SKIPPED and exits 0. Exit 1 with the failed step otherwise.
set -euo pipefail
deb=$(realpath "${1:?usage: dist/check-deb.sh PATH.deb}")

skip() { echo "check-deb: SKIPPED: $*"; exit 0; }
init=
fail() {
    echo "check-deb: FAILED: $*" >&2
    if [ -n "$init" ]; then
        nsenter -t "$init" -a -- systemctl status --no-pager crux >&2 || true
        nsenter -t "$init" -a -- journalctl --no-pager -n 40 -u crux >&2 || true
    fi
    exit 1
}
[ "$(id -u)" -eq 0 ] || skip "needs root (it boots a container)"
command -v systemd-nspawn >/dev/null || skip "no systemd-nspawn (apt-get install systemd-container)"

work=$(mktemp -d /tmp/crux-check-deb.XXXXXX)
nspawn_pid=
cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$nspawn_pid" 2>/dev/null || true
    fi
    umount -l "$work/root" 2>/dev/null || true
    umount -l "$work" 2>/dev/null || true
    rmdir "$work" 2>/dev/null || true
}
trap cleanup EXIT

# The throwaway system: / (its root file system only) under an overlay whose writes go to tmpfs.
mount -t tmpfs -o size=2g crux-check-deb "$work"
mkdir -p "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
cp "$deb" "$work/root/root/crux.deb"
# A host-wide machine id would make journald link journals: give the guest its own. A
# policy-rc.d (container images ship one that forbids every start) would stop postinst.
rm -f "$work/root/etc/machine-id" "$work/root/usr/sbin/policy-rc.d"
systemd-nspawn -D "$work/root" --private-network --register=no --keep-unit --link-journal=no \
    --boot --console=pipe >"$work/console.log" 2>&1 &
nspawn_pid=$!

# Wait (deadline) until a condition holds: wait_for SECONDS WHAT COMMAND...
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "$what: not within ${secs} s"
        kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/console.log" >&2; fail "the container exited"; }
        sleep 0.2
    done
}
guest_pid() { pgrep -P "$nspawn_pid" -x systemd | head -n 1; }
wait_for 30 "the container's systemd" guest_pid
init=$(guest_pid)
in_guest() { nsenter -t "$init" -a -- "$@"; }
booted() { case "$(in_guest systemctl is-system-running 2>/dev/null)" in running | degraded) ;; *) return 1 ;; esac; }
wait_for 60 "the container's boot" booted
echo "check-deb [${SECONDS}s]: booted a throwaway system under systemd ($(in_guest systemctl --version | head -n 1))"

# The guest's network is its loopback only: the wait for network-online.target (which crux.service
# is ordered after, as it binds the node's address) would time out after 2 minutes.
in_guest systemctl mask --quiet systemd-networkd-wait-online.service

# 1. Install with no bloc configured.
out=$(in_guest dpkg -i /root/crux.deb 2>&1) || { echo "$out" >&2; fail "dpkg -i"; }
echo "$out" | grep -q "installed, not started" || { echo "$out" >&2; fail "postinst did not say it left the agent stopped"; }
for f in /usr/bin/crux /etc/crux/crux.toml /lib/systemd/system/crux.service \
    /usr/share/bash-completion/completions/crux /usr/share/zsh/vendor-completions/_crux \
    /usr/share/fish/vendor_completions.d/crux.fish /usr/share/crux/proto/crux/reeve/v1/reeve.proto \
    /usr/share/doc/crux/README.md; do
    in_guest test -s "$f" || fail "the package has no $f"
done
in_guest dpkg-query -W -f='${Conffiles}\n' crux | grep -q /etc/crux/crux.toml || fail "/etc/crux/crux.toml is not a conffile"
in_guest getent passwd crux | grep -q nologin || fail "no crux system user"
[ "$(in_guest stat -c %U:%G:%a /var/lib/crux)" = crux:crux:700 ] || fail "/var/lib/crux is not crux:crux 0700"
verify=$(in_guest systemd-analyze verify /lib/systemd/system/crux.service 2>&1) ||
    { echo "$verify" >&2; fail "systemd-analyze verify crux.service"; }
[ "$(in_guest systemctl is-enabled crux 2>/dev/null || true)" = disabled ] || fail "enabled with no bloc configured"
[ "$(in_guest systemctl is-active crux 2>/dev/null || true)" = inactive ] || fail "started with no bloc configured"
# The shipped conffile parses; with no bloc the agent refuses with the field's name.
refusal=$(in_guest timeout 10 crux agent --config /etc/crux/crux.toml 2>&1 || true)
echo "$refusal" | grep -q bloc || { echo "$refusal" >&2; fail "the agent did not name the missing bloc"; }
echo "check-deb [${SECONDS}s]: installed: files, conffile, crux user, /var/lib/crux, unit verified, not started without a bloc"

# 2. Configure and run postinst again (as dpkg --configure would on an upgrade).
# Top-level keys go before the first [section], as an operator editing the file would put them.
in_guest sed -i '1i bloc = "check-deb"\nbind = "127.0.0.1:7700"\nspace = ["127.0.0.1"]\npreset = "local"' \
    /etc/crux/crux.toml
in_guest sh -c 'crux keygen >/var/lib/crux/keyring && chown crux:crux /var/lib/crux/keyring && chmod 600 /var/lib/crux/keyring'
in_guest env DPKG_MAINTSCRIPT_PACKAGE=crux DPKG_MAINTSCRIPT_NAME=postinst \
    /var/lib/dpkg/info/crux.postinst configure 0.1.0-1 >/dev/null
[ "$(in_guest systemctl is-enabled crux)" = enabled ] || fail "postinst did not enable a configured agent"
active() { [ "$(in_guest systemctl is-active crux)" = active ]; }
t0=$SECONDS
wait_for 60 "crux.service active (READY=1)" active
echo "check-deb [${SECONDS}s]: configured: enabled and active (READY=1 seen by systemd) after $((SECONDS - t0)) s"
[ "$(in_guest systemctl show -p User --value crux)" = crux ] || fail "the unit does not run as crux"
in_guest ps -o user= -C crux | grep -qx crux || fail "the agent process does not run as the crux user"
status=$(in_guest crux status --socket /run/crux/reeve.sock 2>&1) || { echo "$status" >&2; fail "crux status"; }
in_guest crux members --socket /run/crux/reeve.sock | grep -q 127.0.0.1 || fail "crux members does not list the node"
echo "check-deb [${SECONDS}s]: crux status and crux members answer on /run/crux/reeve.sock"

# 3. Stop cleanly, purge.
in_guest systemctl stop crux
[ "$(in_guest systemctl show -p ExecMainStatus --value crux)" = 0 ] || fail "the agent did not exit 0 on stop"
[ "$(in_guest systemctl show -p Result --value crux)" = success ] || fail "systemd reports the stop as failed"
in_guest dpkg --purge crux >/dev/null
for f in /usr/bin/crux /etc/crux/crux.toml /var/lib/crux; do
    ! in_guest test -e "$f" || fail "$f left after purge"
done
echo "check-deb [${SECONDS}s]: stopped with status 0, purged: nothing left"
echo "check-deb [${SECONDS}s]: PASSED"
