//! `flock-hostile-bench [--crux PATH] [--datagrams N] [--frames N] [--preset NAME] [--seed N]`:
//! a flock of three real `crux agent` processes on loopback; an attacker records what it can
//! (the nodes' discovery join requests at a trap address inside their address space, an
//! insider's sealed datagrams and stream frames, most addressed to node 2), then sends node 1
//! N hostile datagrams (default 10^6: random, truncated, bit-flipped, replayed sealed datagrams
//! and join requests, other bloc, wrong key, unknown epoch, oversized, junk handshakes) and
//! hostile stream frames over TCP, from sixteen addresses outside the space. Prints the datagrams
//! sent per kind, the replies received, node 1's drop counters, its RSS (VmRSS) before and after,
//! and whether the flock still agrees. Figures only; the exit status is non-zero only if the run
//! itself fails.
//!
//! The attacker is `agent/tests/hostile/mod.rs`, shared with the test
//! `agent/tests/flock_hostile.rs` (which sends 60,000 and asserts).

#[path = "../../../agent/tests/hostile/mod.rs"]
mod hostile;

use std::path::PathBuf;
use std::time::Duration;

use crux_tests::cluster::Cluster;
use hostile::{Insider, Plan, NODES, TARGET};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(name: &str, default: u64) -> u64 {
    arg(name).map_or(default, |v| {
        v.replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}: a number"))
    })
}

fn main() {
    let crux = arg("--crux").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .expect("this executable")
            .with_file_name("crux")
    });
    assert!(
        crux.is_file(),
        "no crux executable at {} (cargo build --release -p crux-agent, or --crux PATH)",
        crux.display()
    );
    let datagrams = num("--datagrams", 1_000_000);
    let frames = num("--frames", 1_000);
    let seed = num("--seed", 0x5eed);
    let preset = arg("--preset").unwrap_or_else(|| "local".into());

    let mut c = Cluster::new(&crux, 200, 4, &preset);
    for k in NODES {
        c.start(k);
    }
    let started = hostile::now();
    let leader = c.stable_agreement(&NODES, Duration::from_secs(1), Duration::from_secs(60));
    println!(
        "flock of {} agents ({}, preset {preset}) agreed in {:.1} s, leader {}; target node {TARGET} {}",
        NODES.len(),
        crux.display(),
        started.elapsed().as_secs_f64(),
        leader.id,
        c.agent(TARGET).addr
    );
    let mut insider = Insider::new(&c, 150);
    let rec = hostile::record(&c, &mut insider, 3, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("recording: {e}\n{}", c.logs(30)));
    println!(
        "recorded: {} sealed datagrams, {} join requests ({} caught at the trap), {} stream frames",
        rec.sealed.len(),
        rec.initiations.len(),
        rec.initiations.len() - 5,
        rec.frames.len()
    );
    let pid = c.agent(TARGET).pid().expect("running");
    let rss_before = hostile::rss_kib(pid).expect("VmRSS");
    let drops_before = hostile::drops(&c, TARGET);
    let in_before = hostile::counter(&c, TARGET, "crux_datagrams_in_total")
        + hostile::counter(&c, TARGET, "crux_streams_in_total");
    let socks = hostile::attacker_sockets(&c);
    let plan = Plan {
        datagrams,
        frames,
        seed,
        attribute: false,
    };
    let step = (datagrams / 10).max(1);
    let mut next = step;
    let mut out = hostile::attack(&c, &mut insider, &rec, &socks, plan, |sent| {
        if sent >= next {
            next += step;
            let rss = hostile::rss_kib(pid).unwrap_or(0);
            println!("  ... {sent} sent, target RSS {rss} KiB");
        }
    })
    .unwrap_or_else(|e| panic!("attack: {e}\n{}", c.logs(30)));
    // The agent's counters are a snapshot it republishes every 250 ms: read them once they have
    // stood still for a second (and the flock agrees).
    let total = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
    let mut last = (total(&hostile::drops(&c, TARGET)), hostile::now());
    let agreed = hostile::wait(Duration::from_secs(30), || {
        c.agreement(&NODES)?;
        let now = total(&hostile::drops(&c, TARGET));
        if now != last.0 {
            last = (now, hostile::now());
        }
        if last.1.elapsed() < Duration::from_secs(1) {
            return Err("drop counters still moving".into());
        }
        Ok(())
    });
    hostile::late_replies(&socks, &mut out);
    let rss_after = hostile::rss_kib(pid).expect("VmRSS");
    let drops_after = hostile::drops(&c, TARGET);
    let received = hostile::counter(&c, TARGET, "crux_datagrams_in_total")
        + hostile::counter(&c, TARGET, "crux_streams_in_total")
        - in_before;

    println!();
    println!(
        "sent {} hostile inputs in {:.1} s ({:.0}/s), {} insider barriers, {} rejoins",
        out.total(),
        out.elapsed.as_secs_f64(),
        out.total() as f64 / out.elapsed.as_secs_f64(),
        out.barriers,
        out.rejoins
    );
    println!("sent per kind:");
    for (kind, count) in &out.sent {
        println!("  {:<24} {count:>9}", kind.name());
    }
    println!("replies received by the attacker: {}", out.replies.len());
    for r in out.replies.iter().take(20) {
        println!("  {r:?}");
    }
    println!("node {TARGET} drops (this run):");
    let mut total = 0;
    for (reason, v) in &drops_after {
        let d = v - drops_before.get(reason).copied().unwrap_or(0);
        total += d;
        if d > 0 {
            println!("  {reason:<16} {d:>9}");
        }
    }
    println!("  {:<16} {total:>9}", "total");
    println!(
        "node {TARGET} received {received} datagrams and frames in that time (the insider's \
         {} barrier pings and joins, answered, and the flock's own traffic included)",
        out.barriers + out.rejoins
    );
    println!(
        "node {TARGET} RSS (VmRSS): {rss_before} KiB before, {rss_after} KiB after ({:+} KiB)",
        rss_after as i64 - rss_before as i64
    );
    match agreed {
        Ok(()) => println!("flock agreed afterwards: yes"),
        Err(e) => println!("flock agreed afterwards: NO ({e})"),
    }
}
