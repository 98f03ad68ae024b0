//! Catalyst standalone on three loopback agents: each agent holds a topic `bench`; on each,
//! publishers send batches of 256-byte messages through the agent's local socket and one
//! subscriber reads them back. Each message carries the time its publish call began, so the
//! subscriber measures the end-to-end latency (publish call → delivered). Two runs:
//!
//! 1. **full rate**: publishers send as fast as the agents acknowledge (`--batch` messages a
//!    call, two publishers per agent): messages/s published and delivered, latency p50/p99;
//! 2. **paced**: `--rate` messages/s in all (a batch per agent every 2 ms), latency p50/p99.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crux_catalyst::client::Topics;
use crux_catalyst::{Retention, Start};
use crux_tests::cluster::Cluster;

const NODES: usize = 3;
const MESSAGE_BYTES: usize = 256;
const PUBLISHERS_PER_NODE: usize = 2;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn pct(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0
}

/// Results of one run.
struct Run {
    published: u64,
    delivered: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
}

/// Runs publishers (paced at `rate` msgs/s in all, or as fast as possible when `None`) and one
/// subscriber per node for `secs`.
async fn run(sockets: &[PathBuf], topic: &str, secs: f64, batch: usize, rate: Option<u64>) -> Run {
    let base = now();
    let published = Arc::new(AtomicU64::new(0));
    let stop_at = base + Duration::from_secs_f64(secs);
    let mut subs = Vec::new();
    for s in sockets {
        let mut t = Topics::connect(s).await.expect("connect");
        let mut stream = t
            .subscribe(topic, Start::Latest, None)
            .await
            .expect("subscribe");
        subs.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            let drain_until = stop_at + Duration::from_secs(3);
            while let Ok(Ok(Some(b))) =
                tokio::time::timeout_at(drain_until.into(), stream.message()).await
            {
                let t = now().duration_since(base).as_micros() as u64;
                for m in &b.messages {
                    let sent = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                    lat.push(t.saturating_sub(sent));
                    n += 1;
                }
            }
            (n, lat)
        }));
    }
    let mut pubs = Vec::new();
    let per_node = PUBLISHERS_PER_NODE;
    for s in sockets {
        for _ in 0..per_node {
            let s = s.clone();
            let published = published.clone();
            let topic = topic.to_string();
            pubs.push(tokio::spawn(async move {
                let mut t = Topics::connect(&s).await.expect("connect");
                let every = rate.map(|r| {
                    // A batch every 2 ms per publisher.
                    let per_pub = r as f64 / (NODES * per_node) as f64;
                    (
                        Duration::from_millis(2),
                        ((per_pub * 0.002).round() as usize).max(1),
                    )
                });
                let size = every.map(|(_, n)| n).unwrap_or(batch);
                let mut tick = every.map(|(d, _)| {
                    let mut i = tokio::time::interval(d);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    i
                });
                while now() < stop_at {
                    if let Some(i) = tick.as_mut() {
                        i.tick().await;
                    }
                    let sent = now().duration_since(base).as_micros() as u64;
                    let msgs: Vec<Vec<u8>> = (0..size)
                        .map(|_| {
                            let mut m = vec![0x5a; MESSAGE_BYTES];
                            m[..8].copy_from_slice(&sent.to_le_bytes());
                            m
                        })
                        .collect();
                    t.publish(&topic, msgs).await.expect("publish");
                    published.fetch_add(size as u64, Ordering::Relaxed);
                }
            }));
        }
    }
    for p in pubs {
        p.await.expect("publisher");
    }
    let seconds = now().duration_since(base).as_secs_f64();
    let mut delivered = 0;
    let mut latencies_us = Vec::new();
    for s in subs {
        let (n, mut l) = s.await.expect("subscriber");
        delivered += n;
        latencies_us.append(&mut l);
    }
    latencies_us.sort_unstable();
    Run {
        published: published.load(Ordering::Relaxed),
        delivered,
        seconds,
        latencies_us,
    }
}

fn report(what: &str, r: &Run) {
    println!(
        "{what}: {} published in {:.1} s = {:.0} msg/s ({:.1} MB/s of payload), {} delivered; \
         end-to-end p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        r.published,
        r.seconds,
        r.published as f64 / r.seconds,
        r.published as f64 * MESSAGE_BYTES as f64 / r.seconds / 1e6,
        r.delivered,
        pct(&r.latencies_us, 0.5),
        pct(&r.latencies_us, 0.99),
        r.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
}

fn main() {
    let crux = arg("--crux").unwrap_or_else(|| "target/release/crux".into());
    let secs: f64 = arg("--seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let batch: usize = arg("--batch").and_then(|v| v.parse().ok()).unwrap_or(256);
    let rate: u64 = arg("--rate").and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let mut c = Cluster::new(PathBuf::from(&crux), 201, NODES, "local");
    c.start_all();
    let all: Vec<usize> = (1..=NODES).collect();
    c.stable_agreement(&all, Duration::from_secs(1), Duration::from_secs(30));
    let sockets: Vec<PathBuf> = all.iter().map(|k| c.agent(*k).socket.clone()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for s in &sockets {
            let deadline = now() + Duration::from_secs(30);
            loop {
                let made = async {
                    let mut t = Topics::connect(s).await.map_err(|e| e.to_string())?;
                    for topic in ["full", "paced"] {
                        t.create(topic, Retention::default())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(())
                }
                .await;
                match made {
                    Ok(()) => break,
                    Err(e) if now() > deadline => panic!("catalyst not serving: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        println!(
            "{NODES} agents (release), standalone topics, {MESSAGE_BYTES}-byte messages, \
             {PUBLISHERS_PER_NODE} publishers and 1 subscriber per agent, all on this machine ({} \
             CPUs)",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        let r = run(&sockets, "full", secs, batch, None).await;
        report(&format!("full rate, batches of {batch}"), &r);
        let r = run(&sockets, "paced", secs, batch, Some(rate)).await;
        report(&format!("paced at {rate} msg/s"), &r);
    });
}
