//! `store-bench [--crux PATH] [--writes N] [--concurrency C]`: five `crux agent` processes on
//! loopback; prints the latency (p50, p99, max) of document writes made through a node that is
//! not the Raft leader, the write rate with C writers; for Blueprint K/V (issue 16), the rate and
//! p50/p99 of puts of 256-byte values with C writers, the rate of linearizable gets, and the time
//! from a put's acknowledgement to a watch on another node seeing it; and the time from the Raft
//! leader's kill -9 to the first successful write. Figures only.

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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Blueprint K/V through the node at `socket`: puts of 256-byte values and linearizable gets
/// with `conc` clients, then put-to-watch latency seen through `watch_socket`.
async fn kv(socket: &std::path::Path, watch_socket: &std::path::Path, n: usize, conc: usize) {
    use crux_reeve::kv::{Kv, WriteOptions};
    let kv = Kv::connect(socket).await.expect("kv");
    let value = vec![b'v'; 256];
    let t = now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conc {
        let mut kv = kv.clone();
        let value = value.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            for k in 0..n / conc {
                let t = now();
                let r = kv
                    .put(
                        &format!("bench/{w}/{k}"),
                        value.clone(),
                        &WriteOptions::default(),
                    )
                    .await
                    .expect("put");
                assert!(r.written);
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(l) = set.join_next().await {
        lat.extend(l.expect("writer"));
    }
    let took = t.elapsed();
    lat.sort();
    println!(
        "kv: {conc} writers, {} puts of 256 B: {:.0} puts/s, p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        lat.len() as f64 / took.as_secs_f64(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
    let t = now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..conc {
        let mut kv = kv.clone();
        set.spawn(async move {
            for k in 0..n / conc {
                let r = kv.get(&format!("bench/{w}/{k}"), false).await.expect("get");
                assert!(r.found);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let done = (n / conc) * conc;
    println!(
        "kv: {conc} readers, {done} linearizable gets: {:.0} gets/s",
        done as f64 / t.elapsed().as_secs_f64()
    );
    // Put acknowledged → seen by a watch on another node.
    let w = Kv::connect(watch_socket).await.expect("kv");
    let mut rx = w.watch("lat/", true, 0).await.expect("watch");
    let _listing = rx.recv().await;
    let mut kv = kv;
    let mut lat = Vec::new();
    for k in 0..n.min(200) {
        kv.put(&format!("lat/{k}"), value.clone(), &WriteOptions::default())
            .await
            .expect("put");
        let acked = now();
        loop {
            let e = rx.recv().await.expect("watch").expect("event");
            if e.entries.iter().any(|x| x.key == format!("lat/{k}")) {
                break;
            }
        }
        lat.push(acked.elapsed());
    }
    lat.sort();
    println!(
        "kv: watch on another node sees a put {:.2} ms (p50), {:.2} ms (p99) after its ack",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99))
    );
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
    let watcher = (1..=5)
        .find(|k| *k != leader && *k != via)
        .expect("a third node");
    let watch_socket = c.agent(watcher).socket.clone();
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
        kv(&socket, &watch_socket, writes, conc).await;
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
