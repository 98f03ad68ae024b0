//! The flock port of a real agent answers nothing that does not authenticate (issue 15, item 6;
//! DESIGN.md "Node plane": WireGuard's rules).
//!
//! Three agents (nodes 1–3 of a four-node cluster; node 4's address is the attacker's trap, see
//! `hostile/mod.rs`) agree; the attacker records what it can (the nodes' discovery join requests
//! at the trap, an insider's sealed datagrams and stream frames, most addressed to node 2), then
//! floods node 1 from sixteen addresses outside the space with random, truncated, bit-flipped,
//! replayed (sealed datagrams and handshake initiations), other-bloc, wrong-key, unknown-epoch,
//! oversized and junk-handshake datagrams, and hostile stream frames over TCP. Checks: not one
//! byte comes back to the attacker; the flock still agrees afterwards; node 1's drop counters rose
//! by (nearly) every datagram sent; its RSS grew by less than 5 MB.
//!
//! `CRUX_FLOCK_HOSTILE_DATAGRAMS` changes the count (default 60,000); `bench/flock-hostile.sh`
//! sends 10^6 and prints the figures.

mod hostile;

use std::time::Duration;

use crux_tests::cluster::Cluster;
use hostile::{Insider, NODES, TARGET};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);

fn datagram_count() -> u64 {
    std::env::var("CRUX_FLOCK_HOSTILE_DATAGRAMS")
        .ok()
        .map(|v| v.parse().expect("CRUX_FLOCK_HOSTILE_DATAGRAMS: a number"))
        .unwrap_or(60_000)
}

#[test]
fn the_flock_port_gives_no_reply_to_hostile_datagrams() {
    let mut c = Cluster::new(BIN, 1, 4, PRESET);
    for k in NODES {
        c.start(k);
    }
    c.stable_agreement(&NODES, Duration::from_secs(1), CONVERGE);
    let mut insider = Insider::new(&c, 150);
    let rec = hostile::record(&c, &mut insider, 3, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("recording: {e}\n{}", c.logs(30)));
    println!(
        "recorded {} sealed datagrams, {} handshake initiations ({} from the trap), {} frames",
        rec.sealed.len(),
        rec.initiations.len(),
        rec.initiations.len() - 5,
        rec.frames.len()
    );
    let pid = c.agent(TARGET).pid().expect("running");
    let rss_before = hostile::rss_kib(pid).expect("VmRSS");
    let drops_before = hostile::drops(&c, TARGET);
    let socks = hostile::attacker_sockets(&c);
    let n = datagram_count();
    let attribute = std::env::var_os("CRUX_FLOCK_HOSTILE_ATTRIBUTE").is_some();
    let plan = hostile::Plan {
        datagrams: n,
        frames: 200,
        seed: 0x5eed,
        attribute,
    };
    let mut out = hostile::attack(&c, &mut insider, &rec, &socks, plan, |_| {})
        .unwrap_or_else(|e| panic!("attack: {e}\n{}", c.logs(30)));
    // The flock still agrees (and any late reply, e.g. a relayed ack, has had time to come).
    c.stable_agreement(&NODES, Duration::from_secs(1), CONVERGE);
    hostile::late_replies(&socks, &mut out);
    let rss_after = hostile::rss_kib(pid).expect("VmRSS");
    let drops_after = hostile::drops(&c, TARGET);
    let dropped: u64 = drops_after.values().sum::<u64>() - drops_before.values().sum::<u64>();
    println!(
        "{} hostile inputs in {:.1} s ({} barriers, {} rejoins); replies {}; node {TARGET} \
         dropped {dropped}; RSS {} -> {} KiB",
        out.total(),
        out.elapsed.as_secs_f64(),
        out.barriers,
        out.rejoins,
        out.replies.len(),
        rss_before,
        rss_after
    );
    for (kind, count) in &out.sent {
        println!("  {:<24} {count:>8}", kind.name());
    }
    for (what, count) in &out.attributed {
        println!("  replies to {what}: {count}");
    }
    for (reason, v) in &drops_after {
        let before = drops_before.get(reason).copied().unwrap_or(0);
        println!("  dropped {reason:<14} +{}", v - before);
    }
    assert!(
        out.replies.is_empty(),
        "{} replies to hostile input: {:?}",
        out.replies.len(),
        &out.replies[..out.replies.len().min(20)]
    );
    assert!(
        dropped >= n * 95 / 100,
        "node {TARGET} dropped {dropped} of {n} hostile datagrams"
    );
    assert!(
        rss_after < rss_before + 5 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Each way a recorded datagram is refused was taken: sealed for another node (auth_failed),
    // seen before (replay), a join request for another address (misdirected) or not newer than
    // the last of its sender (old_initiation).
    for reason in [
        "auth_failed",
        "replay",
        "misdirected",
        "old_initiation",
        "oversized",
    ] {
        let rose = drops_after.get(reason).copied().unwrap_or(0)
            > drops_before.get(reason).copied().unwrap_or(0);
        assert!(rose, "no {reason} drops: {drops_after:?}");
    }
}
