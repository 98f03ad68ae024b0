#!/usr/bin/env bash
# Side-by-side: the flock (`crux sim --plain` and `crux sim` sealed, as the agent runs) and the
# foca crate (`foca-sim`, bench/foca-sim) on the same simulated network (`lan` preset: 250 µs +
# up to 250 µs jitter one way, independent loss), same seed, same scenarios:
#
#   cold-boot       all nodes start within 1 s (crux: discovery by probing the address space;
#                   foca: each node announces to 3 random nodes started before it)
#   partition-heal  two random halves agree apart, then heal (time from the heal)
#   kill-leader     crux: the leader crashes   | foca has no leader: kill-node, a random node
#   kill-node       crashes (time until every running node sees exactly the running nodes)
#
#   bench/foca-vs-crux.sh                  # 100 and 1,000 nodes, 0 % and 5 % loss
#   NODES="100" LOSSES="0" bench/foca-vs-crux.sh
#   SEED=7 bench/foca-vs-crux.sh           # another seed (default 1)
#   CRUX_BIN=path FOCA_BIN=path bench/foca-vs-crux.sh   # skip the release builds
#
# One run at a time (the machine's cores are shared). Needs jq. Each run's JSON report goes to
# target/foca-vs-crux/<scenario>-<nodes>-<loss>-<impl>.json. foca's configuration is its own
# `Config::new_lan(N)`, untuned; see bench/foca-sim/src/lib.rs for how nodes join.
set -euo pipefail
cd "$(dirname "$0")/.."

SEED="${SEED:-1}"
NODES="${NODES:-100 1000}"
LOSSES="${LOSSES:-0 0.05}"
OUT=target/foca-vs-crux
mkdir -p "$OUT"

if [[ -z "${CRUX_BIN:-}" ]]; then
    cargo build --release -p crux-agent --bin crux >&2
    CRUX_BIN=target/release/crux
fi
if [[ -z "${FOCA_BIN:-}" ]]; then
    cargo build --release -p crux-bench-foca --bin foca-sim >&2
    FOCA_BIN=target/release/foca-sim
fi

# Rows of the table, one per run.
rows=()

# row NAME IMPL FILE : one table row from a JSON report.
row() {
    local label="$1" impl="$2" file="$3"
    rows+=("$(jq -r --arg name "$label" --arg impl "$impl" '
        def f(x): if x == null then "-" else (x * 100 | round / 100 | tostring) end;
        [$name, (.nodes|tostring), ((.loss * 100 | round | tostring) + "%"), $impl,
         (if .converged then "yes" else "NO" end),
         f(.agreement_s), (.bytes_per_node_per_s | round | tostring),
         f(.msgs_per_node_per_s), (.false_positive_deaths | tostring),
         (if .renewed_nodes != null then
            "renewed \(.renewed_nodes), view errors \(.view_errors)"
          else "flaps \(.flaps)" end
          + (if .failed_phase then ", failed " + .failed_phase else "" end)),
         f(.wall_s)] | @tsv' "$file")")
}

for n in $NODES; do
    for loss in $LOSSES; do
        for pair in cold-boot:cold-boot partition-heal:partition-heal kill-leader:kill-node; do
            crux_s="${pair%%:*}"
            foca_s="${pair##*:}"
            label="$crux_s"
            [[ "$crux_s" != "$foca_s" ]] && label="$crux_s / $foca_s"
            base="$OUT/$foca_s-$n-$loss"
            echo "running $label, $n nodes, loss $loss ..." >&2
            "$CRUX_BIN" sim --json --seed "$SEED" --nodes "$n" --loss "$loss" \
                --scenario "$crux_s" --plain > "$base-crux-plain.json"
            row "$label" "crux plain" "$base-crux-plain.json"
            "$CRUX_BIN" sim --json --seed "$SEED" --nodes "$n" --loss "$loss" \
                --scenario "$crux_s" > "$base-crux-sealed.json"
            row "$label" "crux sealed" "$base-crux-sealed.json"
            "$FOCA_BIN" --json --seed "$SEED" --nodes "$n" --loss "$loss" \
                --scenario "$foca_s" > "$base-foca.json"
            row "$label" "foca" "$base-foca.json"
        done
    done
done

{
    printf 'scenario\tnodes\tloss\timpl\tconverged\tagreement_s\tbytes/node/s\tmsgs/node/s\tfalse deaths\tnotes\twall_s\n'
    printf '%s\n' "${rows[@]}"
} | column -t -s $'\t'
