#!/usr/bin/env bash
# Benchmark of real `crux agent` processes on loopback (issue 4):
#   1. seconds until N agents agree on membership and one leader, with seeds configured;
#   2. the same with discovery only (no seeds: the agents probe the address space);
#   3. seconds until every survivor has marked a kill -9'd member dead;
#   4. RSS per agent, and CPU seconds per agent over an idle minute.
#
# Usage: bench/agent-flock.sh [N]        (default N=32; env: PRESET=lan, IDLE_SECS=60, PORT=...)
# Needs: jq. Builds target/release/crux unless CRUX_BIN is set. Addresses 127.0.100.2 ...
# 127.0.100.(N+1), one port; it kills only the agents it started.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-32}
PRESET=${PRESET:-lan}
IDLE_SECS=${IDLE_SECS:-60}
NET=127.0.100
TIMEOUT_SECS=${TIMEOUT_SECS:-60}

command -v jq >/dev/null || { echo "bench: needs jq" >&2; exit 1; }
if [[ -z "${CRUX_BIN:-}" ]]; then
    cargo build --release -q -p crux-agent
    CRUX_BIN=target/release/crux
fi
unset $(env | grep -o '^CRUX_[A-Z_]*' | grep -v '^CRUX_BIN$' || true)

if [[ -z "${PORT:-}" ]]; then
    for _ in $(seq 50); do
        PORT=$((20000 + RANDOM % 40000))
        ss -Hlun "sport = :$PORT" | grep -q . || ss -Hltn "sport = :$PORT" | grep -q . || break
    done
fi

DIR=$(mktemp -d /tmp/crux-bench-XXXXXX)
KEY=$("$CRUX_BIN" keygen)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }

# start_flock MODE: writes configs and starts N agents; MODE is "seeds" or "discovery".
start_flock() {
    local mode=$1 run=$DIR/$1
    PIDS=()
    for k in $(seq "$N"); do
        local d=$run/node$k ip=$NET.$((k + 1))
        mkdir -p "$d"
        local seeds="[]"
        if [[ $mode == seeds ]]; then
            if [[ $k == 1 ]]; then seeds="[\"$NET.3:$PORT\"]"; else seeds="[\"$NET.2:$PORT\"]"; fi
        fi
        (umask 077 && echo "$KEY" >"$d/keyring")
        cat >"$d/crux.toml" <<EOF
bloc = "bench-$$-$mode"
data_dir = "$d"
bind = "$ip:$PORT"
space = ["$NET.2-$NET.$((N + 1))"]
seeds = $seeds
preset = "$PRESET"
socket = "$d/reeve.sock"
grpc_port = $((PORT + 1))
http_port = $((PORT + 2))
log_level = "info"
EOF
        "$CRUX_BIN" agent --config "$d/crux.toml" </dev/null >"$d/agent.log" 2>&1 &
        PIDS+=($!)
        disown $!
    done
}

# view K: "<sorted alive ids>|<leader id>" as node K sees it ("" if it cannot answer yet).
view() {
    local sock=$DIR/$MODE/node$1/reeve.sock
    "$CRUX_BIN" members --json --socket "$sock" 2>/dev/null |
        jq -r '([.[] | select(.state == "alive") | .id] | sort | join(",")) as $a
               | ([.[] | select(.leader) | .id] | first // "none") as $l | "\($a)|\($l)"' 2>/dev/null || true
}

# agreed: every node answers, sees N alive members, and all views are equal.
agreed() {
    local first="" v
    for k in $(seq "$N"); do
        v=$(view "$k")
        [[ -n $v && $v != *"|none" ]] || return 1
        [[ $(tr ',' '\n' <<<"${v%|*}" | wc -l) == "$N" ]] || return 1
        if [[ -z $first ]]; then first=$v; elif [[ $v != "$first" ]]; then return 1; fi
    done
    LEADER=${first#*|}
}

# last_change: the latest membership or leader change logged by any agent of this run, in epoch
# seconds (agents log them at info with UTC timestamps). Once all agree nothing changes, so this
# is when the flock converged, without the polling delay.
last_change() {
    local latest=0 ts
    for k in $(seq "$N"); do
        ts=$(grep -E 'member joined|leader changed' "$DIR/$MODE/node$k/agent.log" | tail -1 | cut -d' ' -f1)
        [[ -n $ts ]] || continue
        ts=$(date -d "$ts" +%s.%N)
        if (($(echo "$ts > $latest" | bc -l))); then latest=$ts; fi
    done
    echo "$latest"
}

# dump_metrics: every agent's /metrics into its dir (for a slow or failed run).
dump_metrics() {
    for k in $(seq "$N"); do
        curl -s "http://$NET.$((k + 1)):$((PORT + 2))/metrics" >"$DIR/$MODE/node$k/metrics.txt" || true
    done
}

wait_agreement() {
    local t0=$1 dumped=0
    until agreed; do
        if ((dumped == 0)) && (($(echo "$(now) - $t0 > 10" | bc -l))); then
            echo "bench: slow ($MODE): metrics saved in $DIR/$MODE/nodeK/metrics.txt" >&2
            dump_metrics
            dumped=1
        fi
        if (($(echo "$(now) - $t0 > $TIMEOUT_SECS" | bc -l))); then
            echo "bench: no agreement within ${TIMEOUT_SECS}s ($MODE); logs in $DIR" >&2
            exit 1
        fi
    done
}

echo "crux bench: $N agents, preset $PRESET, $NET.2-$NET.$((N + 1)) port $PORT, files in $DIR"

for MODE in seeds discovery; do
    t0=$(now)
    start_flock "$MODE"
    t_spawned=$(now)
    wait_agreement "$t0"
    polled=$(elapsed "$t0")
    logged=$(echo "$(last_change) - $t0" | bc -l | xargs printf '%.2f')
    after_last=$(echo "$(last_change) - $t_spawned" | bc -l | xargs printf '%.2f')
    printf '%-44s %6s s (last change logged at %s s, %s s after the last agent was spawned)\n' \
        "converge, $MODE:" "$polled" "$logged" "$after_last"
    if [[ $MODE == seeds ]]; then
        cleanup
    fi
done

# Failure detection: kill -9 a member that is not the leader (the last node unless it leads).
victim=$N
[[ $(jq -r '.id' <<<"$("$CRUX_BIN" status --json --socket "$DIR/$MODE/node$victim/reeve.sock")") != "$LEADER" ]] || victim=$((N - 1))
victim_id=$(tr -d '\n' <"$DIR/$MODE/node$victim/node-id")
kill -9 "${PIDS[$((victim - 1))]}"
t0=$(now)
dead_everywhere() {
    for k in $(seq "$N"); do
        [[ $k == "$victim" ]] && continue
        local s
        s=$("$CRUX_BIN" members --json --socket "$DIR/$MODE/node$k/reeve.sock" 2>/dev/null |
            jq -r --arg id "$victim_id" '.[] | select(.id == $id) | .state')
        [[ $s == dead ]] || return 1
    done
}
until dead_everywhere; do
    if (($(echo "$(now) - $t0 > $TIMEOUT_SECS" | bc -l))); then
        echo "bench: node$victim not dead everywhere within ${TIMEOUT_SECS}s" >&2
        exit 1
    fi
done
printf '%-44s %6s s\n' "kill -9 detected dead by all $((N - 1)) others:" "$(elapsed "$t0")"

# Idle cost of the survivors.
ALIVE=()
for i in "${!PIDS[@]}"; do [[ $((i + 1)) == "$victim" ]] || ALIVE+=("${PIDS[$i]}"); done
ticks() {
    local sum=0
    for p in "${ALIVE[@]}"; do
        read -r -a f <"/proc/$p/stat"
        sum=$((sum + f[13] + f[14]))
    done
    echo $sum
}
c0=$(ticks)
sleep "$IDLE_SECS"
c1=$(ticks)
hz=$(getconf CLK_TCK)
rss_kb=0
for p in "${ALIVE[@]}"; do rss_kb=$((rss_kb + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done
n=${#ALIVE[@]}
printf '%-44s %6.1f MB\n' "RSS per agent (mean of $n):" "$(echo "$rss_kb / $n / 1024" | bc -l)"
printf '%-44s %6.3f s\n' "CPU per agent over ${IDLE_SECS}s idle:" "$(echo "($c1 - $c0) / $hz / $n" | bc -l)"
