//! `store-bench [--crux PATH] [--writes N] [--concurrency C]`: five `crux agent` processes on
//! loopback; prints the latency (p50, p99, max) of document writes made through a node that is
//! not the Raft leader, the write rate with C writers, and the time from the Raft leader's kill -9
//! to the first successful write. Figures only.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crux_proto::grpc::reeve::v1 as pb;
use crux_tests::cluster::Cluster;

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn status(c: &Cluster, k: usize) -> Option<serde_json::Value> {
    let out = c.cli(k, &["store", "status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let crux = arg("--crux").unwrap_or_else(|| "target/release/crux".into());
    let writes: usize = arg("--writes").and_then(|v| v.parse().ok()).unwrap_or(500);
    let conc: usize = arg("--concurrency")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let mut c = Cluster::new(PathBuf::from(&crux), 200, 5, "local");
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), Duration::from_secs(30));
    let st = c.wait_for("three voters and a leader", Duration::from_secs(30), || {
        let s = status(&c, 1).ok_or("no status")?;
        if s["voters"].as_array().map(|v| v.len()) == Some(3) && s["leader_id"] != "" {
            Ok(s)
        } else {
            Err(format!("{s}"))
        }
    });
    let leader_id = st["leader_id"].as_str().unwrap_or_default().to_string();
    let leader = c.index_of(&leader_id).expect("leader is ours");
    let via = (1..=5).find(|k| *k != leader).expect("a non-leader");
    println!(
        "5 agents; Raft leader node{leader}; writes through node{via} (voters: {})",
        st["voters"]
    );
    let socket = c.agent(via).socket.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch = crux_reeve::client::socket_channel(&socket, Duration::from_secs(5))
            .await
            .expect("socket");
        let client = pb::reeve_client::ReeveClient::new(ch);
        let one = move |k: usize| {
            let mut c = client.clone();
            async move {
                let t = now();
                c.doc_put(pb::DocPutRequest {
                    key: format!("bench/{k}"),
                    value: "x".repeat(100),
                    unconditional: true,
                    ..Default::default()
                })
                .await
                .map(|_| t.elapsed())
            }
        };
        // Sequential: latency.
        let mut lat = Vec::with_capacity(writes);
        for k in 0..writes {
            lat.push(one(k).await.expect("write"));
        }
        lat.sort();
        let total: Duration = lat.iter().sum();
        println!(
            "one writer, {writes} writes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.0} writes/s",
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
            writes as f64 / total.as_secs_f64()
        );
        // Concurrent: rate.
        let t = now();
        let mut set = tokio::task::JoinSet::new();
        for w in 0..conc {
            let one = one.clone();
            let n = writes;
            set.spawn(async move {
                for k in 0..n / conc {
                    one(w * 100_000 + k).await.expect("write");
                }
            });
        }
        while set.join_next().await.is_some() {}
        let done = (writes / conc) * conc;
        println!(
            "{conc} writers, {done} writes: {:.0} writes/s",
            done as f64 / t.elapsed().as_secs_f64()
        );
    });
    // The Raft leader's kill -9: time to the first successful write through a survivor.
    c.kill9(leader);
    let t = now();
    let out = c.wait_for("a write after the kill", Duration::from_secs(30), || {
        let o = c.cli(
            via,
            &[
                "muster",
                "add",
                "--api",
                "bench",
                "--inst",
                "bench_1",
                "--file",
                &format!("sha256:{}", "ef".repeat(32)),
                "--function",
                "f",
            ],
        );
        if o.status.success() {
            Ok(t.elapsed())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).to_string())
        }
    });
    println!(
        "kill -9 of the Raft leader: first successful write {:.2} s later (polled through the CLI)",
        out.as_secs_f64()
    );
}
