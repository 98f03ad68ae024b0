//! Benchmark 3: the time a registry change takes to reach a `Watch` on every node.
//!
//! A flock of real agents; one `Watch(api:wbench)` open on every node's socket; then, `reps`
//! times, an instance registered on one node (round robin), the time until every watcher has
//! seen it, and likewise for its deregistration. Times run from just before the call.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_reeve::client::reeve_client;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{self, count_over, start_flock, summary_ms};

/// `registry-bench watch` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct WatchArgs {
    /// The crux executable (default: `crux` beside this binary).
    #[arg(long)]
    pub crux: Option<PathBuf>,
    /// Nodes of the flock.
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Registrations (each followed by its deregistration).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// Longest wait for one change to reach every watcher, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// What one watcher saw of one instance.
struct Seen {
    node: usize,
    id: String,
    put: bool,
    at: Instant,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let bin = common::crux_bin(args.crux.clone())?;
    let n = args.nodes;
    let t = Instant::now();
    let cluster = start_flock(&bin, n, Duration::from_secs(90)).await?;
    println!(
        "watch: {n} agents ready, agreed and linked in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (tx, mut rx) = mpsc::unbounded_channel::<Seen>();
    let mut clients = Vec::new();
    for (node, a) in cluster.agents.iter().enumerate() {
        let mut c = reeve_client(&a.socket).await?;
        let mut events = c
            .watch(rpb::WatchRequest {
                selector: "api:wbench".into(),
                horde: String::new(),
                from_revision: 0,
            })
            .await?
            .into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = events.message().await {
                let at = Instant::now();
                for i in ev.put {
                    let _ = tx.send(Seen {
                        node,
                        id: i.id,
                        put: true,
                        at,
                    });
                }
                for i in ev.remove {
                    let _ = tx.send(Seen {
                        node,
                        id: i.id,
                        put: false,
                        at,
                    });
                }
            }
        });
        clients.push(c);
    }
    drop(tx);

    let timeout = Duration::from_secs(args.timeout);
    // Per change: the time until every watcher saw it, and each remote watcher's time.
    let (mut reg_all, mut reg_each) = (Vec::new(), Vec::new());
    let (mut dereg_all, mut dereg_each) = (Vec::new(), Vec::new());
    for i in 0..args.reps {
        let at = i % n;
        let req = common::running(
            "wbench",
            &format!("wbench_{i}"),
            "127.0.0.1:9",
            Duration::from_secs(60),
        );
        let t0 = Instant::now();
        let r = clients[at].register(req).await?.into_inner();
        let times = seen_by_all(&mut rx, &r.id, true, n, t0, timeout).await?;
        reg_all.push(*times.values().max().unwrap_or(&Duration::ZERO));
        reg_each.extend(times.iter().filter(|(k, _)| **k != at).map(|(_, d)| *d));

        let t0 = Instant::now();
        clients[at]
            .deregister(rpb::DeregisterRequest {
                id: r.id.clone(),
                token: r.token,
            })
            .await?;
        let times = seen_by_all(&mut rx, &r.id, false, n, t0, timeout).await?;
        dereg_all.push(*times.values().max().unwrap_or(&Duration::ZERO));
        dereg_each.extend(times.iter().filter(|(k, _)| **k != at).map(|(_, d)| *d));
    }
    println!();
    println!(
        "{n} nodes, {} changes each way, ms from the call to the watch event",
        args.reps
    );
    println!("{:<34} {:>28} {:>9}", "", "p50 / p99 / max ms", ">= 20 ms");
    for (what, v) in [
        ("register: every watcher saw it", &mut reg_all),
        ("register: each remote watcher", &mut reg_each),
        ("deregister: every watcher saw it", &mut dereg_all),
        ("deregister: each remote watcher", &mut dereg_each),
    ] {
        let slow = count_over(v, Duration::from_millis(20));
        println!(
            "{what:<34} {:>28} {:>9}",
            summary_ms(v),
            format!("{slow}/{}", v.len())
        );
    }
    drop(clients);
    drop(cluster);
    Ok(())
}

/// Waits until every one of the `n` watchers has seen `id` put (or removed); returns each
/// watcher's time since `t0`. (Changes are made one at a time, so any other event is stale.)
async fn seen_by_all(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    id: &str,
    put: bool,
    n: usize,
    t0: Instant,
    timeout: Duration,
) -> anyhow::Result<HashMap<usize, Duration>> {
    let mut times = HashMap::new();
    let deadline = t0 + timeout;
    while times.len() < n {
        let s = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "{} of {n} watchers saw {} of {id} within {timeout:?}",
                    times.len(),
                    if put {
                        "the registration"
                    } else {
                        "the removal"
                    }
                )
            })?;
        let Some(s) = s else {
            bail!("every watch stream ended");
        };
        if s.id == id && s.put == put {
            times
                .entry(s.node)
                .or_insert(s.at.saturating_duration_since(t0));
        }
    }
    Ok(times)
}
