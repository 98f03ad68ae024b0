//! Issue 23: a merge keeps the majority's leader. For many seeds, a small flock (5–13 nodes,
//! `lan`, 0–5 % loss, security on or off) converges, a random strict minority (one node up to
//! just under half, the leader among them or not) is cut off long enough for it to elect its
//! own leader, and the cut heals in a random order: at once, or one way first (the minority
//! hears the majority, or the majority hears the minority, for a random while). Then:
//!
//! * the flock agrees again, on the leader the majority followed just before the heal;
//! * no node of the majority followed another leader from the heal on (not even for a moment);
//! * no node of the majority declared another dead.
//!
//! A failure names the seed; `SIM_SEED=<seed> cargo test -p crux-flock --test sim_leader_merge
//! one_seed -- --nocapture` replays it.

use std::time::Duration;

use crux_flock::sim::{Sim, SimConfig};
use crux_flock::{NodeId, Preset};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const CHECK_EVERY: Duration = Duration::from_millis(100);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The leader most nodes of `side` follow.
fn side_leader(sim: &Sim, side: &[usize]) -> Option<NodeId> {
    let mut votes = std::collections::BTreeMap::<NodeId, usize>::new();
    for &i in side {
        if let Some(l) = sim.flock(i).and_then(|f| f.leader()) {
            *votes.entry(l.id).or_default() += 1;
        }
    }
    votes.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id)
}

fn switches(sim: &Sim, i: usize) -> u32 {
    sim.metrics().leader_switches.get(i).map_or(0, |s| s.1)
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x23);
    let n = rng.gen_range(5..=13usize);
    let k = rng.gen_range(1..=(n - 1) / 2);
    let loss = [0.0, 0.0, 0.02, 0.05][rng.gen_range(0..4)];
    let plain = rng.gen_bool(0.3);
    let order = rng.gen_range(0..3); // 0: at once; 1: minority hears first; 2: majority first
    let one_way_for = Duration::from_millis(rng.gen_range(200..3000));
    let mut cfg = SimConfig::new(n, seed, Preset::Lan);
    cfg.net.loss = loss;
    if plain {
        cfg.security = None;
    }
    let ctx = format!(
        "seed {seed} ({n} nodes, {k} cut off, {:.0} % loss{}, heal order {order})",
        loss * 100.0,
        if plain { ", plain" } else { "" }
    );
    let mut sim = Sim::new(cfg).map_err(|e| e.to_string())?;
    sim.start_all_within(secs(1));
    if sim.run_until_agreed(secs(40), CHECK_EVERY).is_none() {
        return Err(format!("{ctx}: no agreement after cold boot"));
    }
    sim.run_for(secs(2));
    let leader = sim.agreement(false).leaders.iter().next().copied();
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(sim.rng());
    let (minority, majority) = all.split_at(k);
    let (minority, majority) = (minority.to_vec(), majority.to_vec());
    sim.partition(std::slice::from_ref(&minority));
    // Long enough for the minority to lose the majority's leader and elect its own.
    sim.run_for(secs(15));
    let kept = side_leader(&sim, &majority);
    let theirs = side_leader(&sim, &minority);
    let cut_off = leader.is_some_and(|l| minority.iter().any(|&i| sim.node_id(i) == l));
    let ctx = format!("{ctx}, leader cut off: {cut_off}, majority {kept:?}, minority {theirs:?}");
    if kept.is_none() {
        return Err(format!("{ctx}: the majority has no leader before the heal"));
    }
    let before: Vec<u32> = (0..n).map(|i| switches(&sim, i)).collect();
    let deaths_from = sim.metrics().live_deaths.len();
    sim.partition(&[]);
    if order != 0 {
        // One way first: (1) the minority hears the majority, (2) the other way round.
        for &a in &minority {
            for &b in &majority {
                if order == 1 {
                    sim.block(a, b);
                } else {
                    sim.block(b, a);
                }
            }
        }
        sim.run_for(one_way_for);
    }
    sim.heal();
    let heal_at = sim.now();
    if sim.run_until_agreed(secs(40), CHECK_EVERY).is_none() {
        return Err(format!(
            "{ctx}: no agreement after the heal: {:?}",
            sim.agreement(false)
        ));
    }
    let now = sim.agreement(false).leaders.iter().next().copied();
    if now != kept {
        return Err(format!("{ctx}: the flock follows {now:?} after the heal"));
    }
    for &i in &majority {
        let changed = switches(&sim, i) - before[i];
        if changed > 0 {
            return Err(format!(
                "{ctx}: node {i} of the majority changed leader {changed} times"
            ));
        }
    }
    let m = sim.metrics();
    let in_majority = |x: u32| majority.contains(&(x as usize));
    let deaths = m.live_deaths[deaths_from.min(m.live_deaths.len())..]
        .iter()
        .filter(|(_, a, b)| in_majority(*a) && in_majority(*b))
        .count();
    if deaths > 0 {
        let list: Vec<String> = m.live_deaths[deaths_from.min(m.live_deaths.len())..]
            .iter()
            .filter(|(_, a, b)| in_majority(*a) && in_majority(*b))
            .map(|(at, a, b)| format!("{at:?} {a}->{b}"))
            .collect();
        return Err(format!(
            "{ctx}: {deaths} deaths declared inside the majority after the heal at {:?}: {}",
            heal_at,
            list.join(", ")
        ));
    }
    Ok(())
}

fn run_seeds(seeds: impl Iterator<Item = u64>) {
    let failures: Vec<String> = seeds.filter_map(|s| run_seed(s).err()).collect();
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_majority_keeps_its_leader_seeds_0_to_19() {
    run_seeds(0..20);
}

#[test]
fn the_majority_keeps_its_leader_seeds_20_to_39() {
    run_seeds(20..40);
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
