#!/usr/bin/env bash
# Runs issue 2's 1,000-node scenarios over several seeds and prints the spread of the figures, so
# that a target is judged on more than one lucky seed.
#
#   bench/sim-seeds.sh              # seeds 1-10, 1,000 nodes
#   SEEDS="1 2 3" NODES=300 bench/sim-seeds.sh
#   CRUX_BIN=path bench/sim-seeds.sh
#
# Needs jq. Reports go to target/sim-bench/seeds-<scenario>-<seed>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="${SEEDS:-1 2 3 4 5 6 7 8 9 10}"
NODES="${NODES:-1000}"
OUT=target/sim-bench
mkdir -p "$OUT"

if [[ -z "${CRUX_BIN:-}" ]]; then
    cargo build --release -p crux-agent --bin crux >&2
    CRUX_BIN=target/release/crux
fi

# scenario NAME TARGET-KEY LIMIT ARGS... : runs every seed, prints one summary line.
scenario() {
    local name="$1" key="$2" limit="$3"
    shift 3
    local files=()
    for seed in $SEEDS; do
        local f="$OUT/seeds-$name-$seed.json"
        echo "running $name seed $seed: crux sim $* --nodes $NODES" >&2
        "$CRUX_BIN" sim "$@" --nodes "$NODES" --seed "$seed" --json >"$f"
        files+=("$f")
    done
    jq -rs --arg name "$name" --arg key "$key" --argjson limit "$limit" '
        def r: if . == null then "-" else (. * 100 | round / 100 | tostring) end;
        (map(.[$key]) | map(select(. != null)) | sort) as $v
        | ($v | length) as $n
        | [ $name,
            "\($key): min \($v[0] | r) median \(if $n > 0 then $v[($n / 2 | floor)] else null end | r) max \($v[-1] | r)",
            "within \($limit): \([$v[] | select(. <= $limit)] | length)/\(length)",
            "converged \([.[] | select(.converged)] | length)/\(length)",
            "false deaths \(map(.false_positive_deaths) | add)",
            "term conflicts \(map(.term_conflicts) | add)",
            "B/node/s median \(map(.bytes_per_node_per_s) | sort | .[(length / 2 | floor)] | r)"
          ] | join("  |  ")' "${files[@]}"
}

scenario cold-boot-loss5 agreement_s 10 --scenario cold-boot --loss 0.05
scenario kill-leader leader_agreement_s 5 --scenario kill-leader --preset lan
scenario partition-heal agreement_s 10 --scenario partition-heal
