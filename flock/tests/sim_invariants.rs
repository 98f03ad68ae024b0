//! Whole-flock invariants over many seeds (issue 2, item 6), in the style of TigerBeetle's VOPR:
//! each seed builds a small flock (5–20 nodes, `lan` preset, 0–4 % loss, some duplication),
//! lets it converge, then three times injects a fault drawn from the seed (crash and return,
//! restart, crash of the leader, symmetric partition, one-way block), heals it, and checks:
//!
//! * the flock converges from the cold boot, and again after the fault heals (every running node
//!   sees exactly the running nodes at their current boot ids, and follows one leader);
//! * at most one leader per term while the flock is one connected flock;
//! * no false deaths (a running node declared dead by a node that could reach it) below 5 % loss;
//! * no datagram over the MTU;
//! * every tenth seed, replaying it reproduces the run bit for bit.
//!
//! Nodes run with security on (as the agent does); `invariants_hold_without_security_*` runs
//! the membership protocol alone.
//!
//! A failure names the seed; `SIM_SEED=<seed> cargo test -p crux-flock --test sim_invariants
//! one_seed -- --nocapture` replays just that seed (`SIM_PLAIN=1`: without security; `SIM_LOG=1`:
//! with the leader and member events of the last 20 s in the message), and
//! `SIM_SWEEP=<from>..<to> cargo test --release … sweep` hunts over many seeds.

use std::time::Duration;

use crux_flock::sim::{Sim, SimConfig};
use crux_flock::{Event, Preset};
use rand::Rng;

const SEEDS: u64 = 120;
const CHECK_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Fault {
    CrashAndReturn,
    CrashLeader,
    Restart,
    Partition,
    OneWay,
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Runs one seed; returns the run's hashes, or what went wrong.
fn run_seed(seed: u64) -> Result<(u64, u64), String> {
    run_seed_in(seed, Mode::Default)
}

/// Which nodes a seed runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// [`SimConfig::new`]'s default: security on, as the agent runs.
    Default,
    /// Security off: the membership protocol alone.
    Plain,
}

fn run_seed_in(seed: u64, mode: Mode) -> Result<(u64, u64), String> {
    let n = 5 + (seed % 16) as usize;
    let loss = [0.0, 0.01, 0.02, 0.03, 0.04][(seed % 5) as usize];
    let mut cfg = SimConfig::new(n, seed, Preset::Lan);
    cfg.net.loss = loss;
    cfg.net.duplicate = if matches!(seed % 3, 0) { 0.02 } else { 0.0 };
    cfg.log_events = std::env::var_os("SIM_LOG").is_some();
    if mode == Mode::Plain || std::env::var_os("SIM_PLAIN").is_some() {
        cfg.security = None;
    }
    let plain = if cfg.security.is_none() {
        ", plain"
    } else {
        ""
    };
    let mut sim = Sim::new(cfg).map_err(|e| e.to_string())?;
    let ctx = format!("seed {seed} ({n} nodes, {:.0} % loss{plain})", loss * 100.0);

    sim.start_all_within(secs(1));
    if sim.run_until_agreed(secs(40), CHECK_EVERY).is_none() {
        let agreement = sim.agreement(false);
        let log = leader_log(&sim);
        return Err(format!(
            "{ctx}: no agreement after cold boot: {agreement:?}{log}"
        ));
    }
    sim.watch_terms(true);
    sim.run_for(secs(2));
    for round in 0..3 {
        inject_and_heal(&mut sim, &ctx, round).map_err(|e| e + &leader_log(&sim))?;
    }
    Ok((sim.trace_hash(), sim.state_hash()))
}

/// With `SIM_LOG` set: the leader and member changes of the last 20 s, one line each.
fn leader_log(sim: &Sim) -> String {
    let since = sim.now().saturating_sub(secs(20));
    let mut out = String::new();
    if sim.event_log().is_empty() {
        return out;
    }
    for i in 0..sim.len() {
        let Some(f) = sim.flock(i) else { continue };
        let leader = f.leader().map(|l| (l.id, l.term));
        let live = f.live_count();
        out += &format!(
            "\n  now: node {i} ({}) follows {leader:?}, sees {live} live",
            sim.node_id(i)
        );
    }
    for e in sim.event_log().iter().filter(|e| e.at >= since) {
        if let Event::LeaderChanged(v) = &e.event {
            let v = v.map(|v| (v.id, v.term));
            out += &format!(
                "\n  {:?} node {} ({}): leader {v:?}",
                e.at,
                e.node,
                sim.node_id(e.node)
            );
        }
        match &e.event {
            Event::MemberDead(m) => {
                out += &format!(
                    "\n  {:?} node {}: dead {} boot {}",
                    e.at, e.node, m.id, m.boot
                );
            }
            Event::MemberSuspect(m) => {
                let inc = m.incarnation;
                out += &format!(
                    "\n  {:?} node {}: suspects {} incarnation {inc}",
                    e.at, e.node, m.id
                );
            }
            Event::MemberUpdated(m) => {
                let (inc, st) = (m.incarnation, m.state.as_str());
                out += &format!(
                    "\n  {:?} node {}: {} {st} incarnation {inc}",
                    e.at, e.node, m.id
                );
            }
            _ => {}
        }
    }
    out
}

/// Injects one fault drawn from the simulation's RNG, heals it, and checks the invariants.
fn inject_and_heal(sim: &mut Sim, ctx: &str, round: u32) -> Result<(), String> {
    let n = sim.len();
    let fault = match sim.rng().gen_range(0..5) {
        0 => Fault::CrashAndReturn,
        1 => Fault::CrashLeader,
        2 => Fault::Restart,
        3 => Fault::Partition,
        _ => Fault::OneWay,
    };
    let mut victim = sim.rng().gen_range(0..n);
    if let Fault::CrashLeader = fault {
        let a = sim.agreement(false);
        victim = a
            .leaders
            .iter()
            .next()
            .and_then(|&id| sim.index_of(id))
            .unwrap_or(victim);
    }
    let ctx = format!("{ctx}, round {round}, {fault:?} of node {victim}");
    let old_boot = sim.boot(victim);
    match fault {
        Fault::CrashAndReturn | Fault::CrashLeader => {
            sim.crash(victim);
            let crashed = sim.now();
            if sim
                .run_until_agreed(crashed + secs(40), CHECK_EVERY)
                .is_none()
            {
                return Err(format!(
                    "{ctx}: no agreement within 40 s of the crash: {:?}",
                    sim.agreement(false)
                ));
            }
            sim.run_for(secs(2));
            sim.start(victim);
        }
        Fault::Restart => sim.restart(victim),
        Fault::Partition => {
            sim.watch_terms(false);
            let k = sim.rng().gen_range(1..=n / 2);
            let mut side: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(side.as_mut_slice(), sim.rng());
            side.truncate(k);
            sim.partition(&[side]);
            sim.run_for(secs(8));
            sim.heal();
        }
        Fault::OneWay => {
            let other = (victim + 1 + sim.rng().gen_range(0..n - 1)) % n;
            sim.block(victim, other);
            sim.run_for(secs(8));
            sim.heal();
        }
    }
    let healed = sim.now();
    if sim
        .run_until_agreed(healed + secs(60), CHECK_EVERY)
        .is_none()
    {
        return Err(format!(
            "{ctx}: no agreement within 60 s after the fault healed at {healed:?}: {:?}",
            sim.agreement(false)
        ));
    }
    if !matches!(fault, Fault::Partition | Fault::OneWay) {
        let id = sim.node_id(victim);
        let boot = sim.boot(victim);
        if boot <= old_boot {
            return Err(format!("{ctx}: restarted node kept boot {old_boot:?}"));
        }
        for i in 0..n {
            let seen = sim.flock(i).and_then(|f| f.member(id)).map(|m| m.info.boot);
            if seen != Some(boot) {
                return Err(format!(
                    "{ctx}: node {i} sees the node at boot {seen:?}, not {boot:?}"
                ));
            }
        }
    }
    sim.watch_terms(true);
    sim.run_for(secs(3));
    let m = sim.metrics();
    if m.term_conflicts() > 0 {
        let terms: Vec<_> = m.term_leaders.iter().filter(|(_, l)| l.len() > 1).collect();
        return Err(format!("{ctx}: more than one leader per term: {terms:?}"));
    }
    if !m.false_dead.is_empty() {
        return Err(format!(
            "{ctx}: running nodes declared dead by nodes that could reach them: {:?}",
            m.false_dead
        ));
    }
    if m.oversized_datagrams > 0 {
        return Err(format!(
            "{ctx}: {} datagrams over the MTU",
            m.oversized_datagrams
        ));
    }
    if !sim.agreement(true).agreed {
        return Err(format!(
            "{ctx}: agreement lost again: {:?}",
            sim.agreement(false)
        ));
    }
    Ok(())
}

fn run_seeds(seeds: impl Iterator<Item = u64>) {
    run_seeds_in(seeds, Mode::Default);
}

fn run_seeds_in(seeds: impl Iterator<Item = u64>, mode: Mode) {
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed_in(seed, mode) {
            Ok(hashes) => {
                if matches!(seed % 10, 0) {
                    let again = run_seed_in(seed, mode);
                    if again.as_ref() != Ok(&hashes) {
                        failures.push(format!(
                            "seed {seed}: replay differs: {hashes:?} then {again:?}"
                        ));
                    }
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// Four tests so that the test harness spreads the seeds over the machine's cores.

#[test]
fn invariants_hold_seeds_0_to_29() {
    run_seeds(0..SEEDS / 4);
}

#[test]
fn invariants_hold_seeds_30_to_59() {
    run_seeds(SEEDS / 4..SEEDS / 2);
}

#[test]
fn invariants_hold_seeds_60_to_89() {
    run_seeds(SEEDS / 2..3 * SEEDS / 4);
}

#[test]
fn invariants_hold_seeds_90_to_119() {
    run_seeds(3 * SEEDS / 4..SEEDS);
}

/// The same invariants with security off (the membership protocol alone).
#[test]
fn invariants_hold_without_security_seeds_0_to_59() {
    run_seeds_in(0..60, Mode::Plain);
}

/// Replays the seed named by `SIM_SEED` (ignored unless that variable is set).
#[test]
fn one_seed() {
    let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) else {
        return;
    };
    if let Err(e) = run_seed(seed) {
        panic!("{e}");
    }
}

/// Runs the seeds `SIM_SWEEP=<from>..<to>` names (nothing unless that variable is set), for
/// longer hunts: `SIM_SWEEP=0..2000 cargo test --release -p crux-flock --test sim_invariants sweep`.
#[test]
fn sweep() {
    let Some(range) = std::env::var("SIM_SWEEP").ok() else {
        return;
    };
    let (from, to) = range.split_once("..").expect("SIM_SWEEP is <from>..<to>");
    let (from, to): (u64, u64) = (from.parse().expect("number"), to.parse().expect("number"));
    run_seeds(from..to);
}

/// Seeds that broke an invariant with security off, with the core of 2026-11-22 01:05 UTC
/// (`SIM_PLAIN=1` `sweep` over 0..5000: 6 failing seeds, 0.12 %): a live node declared dead a
/// few seconds after a partition healed (3350 at 0 % loss; 372, 1339, 1716, 1799), two leaders
/// for one term after the leader restarted (1089). They pass since; kept as regression seeds
/// (`SIM_PLAIN=1` `sweep` over 0..2000 passes too, core of 2026-11-22 04:10 UTC).
#[test]
fn known_core_failures_plain() {
    run_seeds_in([3350, 372, 1339, 1716, 1799, 1089].into_iter(), Mode::Plain);
}

/// Seeds that broke an invariant with security on, with the core of 2026-11-22 01:00 UTC
/// (`sweep` over 0..2000: 19 failing seeds, 0.95 %): running nodes declared dead by nodes that
/// could reach them (1555 at 0 % loss after a one-way block; 1243: ten nodes after a crash and
/// return; 637, 701, 718), agreement lost again after a restart (775 at 0 % loss) or a heal
/// (454), no agreement within 40 s of a leader crash (517). They pass since the
/// make-before-break key rotation; kept as regression seeds. (Since the rng is seeded before
/// the first timers are drawn, 2026-12-07, a seed runs another schedule than the one that
/// failed; 517 fails again in another way: see [`known_core_failures_secure_2`].)
#[test]
fn known_core_failures_secure() {
    run_seeds_in(
        [1555, 775, 1243, 637, 701, 718, 454].into_iter(),
        Mode::Default,
    );
}

/// Seeds that break an invariant with security on, with the core of 2026-11-22 04:10 UTC
/// (`sweep` over 0..2000: 1 failing seed, 0.05 %; `SIM_PLAIN=1`: none): a running node declared
/// dead by a node that could reach it after a partition healed (1159 at 4 % loss). Seeds 973,
/// 1237, 1442 (agreement lost right after a partition healed: a suspicion started during the
/// partition, its buddy probes slowed by Lifeguard awareness, killed the suspect after the heal)
/// and 988 (a false death after a leader crash), which sweeps of earlier cores of this day found,
/// pass with it; that class may still hide in other seeds.
///
/// Seed 517 with the rng seeded before the first timers (2026-12-07; `sweep` over 0..600: 1
/// failing seed, against 0 with the old seeding): two groups form at cold boot (7 and 3 nodes),
/// both leaders upgrade their solo claims to term 2, the smaller group's leader wins on node id
/// (issue 23: a merge must keep the larger side's leader), and while the 7 switch keys one of
/// them is declared dead by a node of the 3 (its refutation arrives after the 1.5 s suspicion).
///
/// Ignored so that CI stays green until the core is fixed; `SIM_LOG=1 SIM_SEED=<seed> … one_seed`
/// prints the leader and member events around a failure.
#[test]
#[ignore = "core issues reported to the lead; un-ignore once fixed"]
fn known_core_failures_secure_2() {
    run_seeds_in([1159, 517].into_iter(), Mode::Default);
}
