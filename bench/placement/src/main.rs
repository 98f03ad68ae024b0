//! `placement-bench [--crux PATH] [--galumph PATH]`: five `crux agent` processes on loopback
//! running the example plugin `galumph`; prints the time from `crux proctor apply` to
//! `converged` for 3 and for 20 instances, the time to replace an instance after a node's
//! kill -9, and the agent's memory (RSS) with 20 plugin children on one node. Figures only; kills
//! only the agents (and their plugins) it started.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crux_tests::cluster::Cluster;

const WAIT: Duration = Duration::from_secs(120);

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

fn json(c: &Cluster, k: usize, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = c.cli(k, args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn apply(c: &Cluster, k: usize, name: &str, text: &str) -> u64 {
    let file = c.dir().join(name);
    std::fs::write(&file, text).expect("write intent");
    let f = file.display().to_string();
    json(c, k, &["proctor", "apply", &f, "--json"]).expect("apply")["generation"]
        .as_u64()
        .expect("generation")
}

/// Waits until every service is converged at `generation` or later with `running` instances in
/// all; returns the status.
fn converged(c: &Cluster, k: usize, generation: u64, running: u64) -> serde_json::Value {
    c.wait_for("converged", WAIT, || {
        let s = json(c, k, &["proctor", "status", "--json"])?;
        let svcs = s["services"].as_array().cloned().unwrap_or_default();
        let total: u64 = svcs.iter().filter_map(|v| v["running"].as_u64()).sum();
        let all = !svcs.is_empty() && svcs.iter().all(|v| v["state"] == "converged");
        if s["generation"].as_u64() >= Some(generation) && all && total == running {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// A service run by galumph's function `galumph2_3` (the function names the version galumph
/// serves; api and inst are the service's own).
fn service(api: &str, inst: &str, art: &str, placement: &str) -> String {
    format!(
        "[[service]]\napi = {api:?}\ninst = {inst:?}\nartifact = {art:?}\nfunction = \"galumph2_3\"\n\
         placement = {placement:?}\n\n"
    )
}

fn main() {
    let crux = arg("--crux").unwrap_or_else(|| "target/release/crux".into());
    let galumph = arg("--galumph").unwrap_or_else(|| "target/release/galumph".into());
    let mut c = Cluster::new(PathBuf::from(&crux), 201, 5, "local");
    for k in 1..=5 {
        c.append_config(
            k,
            "[registry]\nheartbeat_interval = \"1s\"\ngrace = \"4s\"\n",
        );
    }
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), WAIT);
    c.wait_for("the store's voters", WAIT, || {
        let s = json(&c, 1, &["store", "status", "--json"])?;
        if s["voters"].as_array().map(|v| v.len()) == Some(3) && s["leader_addr"] != "" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let g = Path::new(&galumph).display().to_string();
    let art = json(&c, 1, &["pastiche", "put", &g, "--json"]).expect("put")["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    println!("5 agents on loopback; artifact galumph {art}");
    // The agent's memory before any plugin ran.
    let pid = c.agent(2).pid().expect("node2 runs");
    let before = rss_kib(pid);

    // 3 instances.
    let t = now();
    let gen = apply(
        &c,
        2,
        "three.toml",
        &service("galumph2", "galumph2_3", &art, "count 3; distinct host"),
    );
    converged(&c, 2, gen, 3);
    println!(
        "apply -> converged, 3 instances (count 3; distinct host): {:?}",
        t.elapsed()
    );

    // 20 instances: 5 services of count 4.
    let text: String = (1..=5)
        .map(|i| service(&format!("svc{i}"), &format!("svc{i}_1"), &art, "count 4"))
        .collect();
    let t = now();
    let gen = apply(&c, 2, "twenty.toml", &text);
    let st = converged(&c, 2, gen, 20);
    println!(
        "apply -> converged, 20 instances (5 services x count 4): {:?}",
        t.elapsed()
    );

    // A node's kill -9: its instances placed elsewhere.
    let leader = c.agreement(&all).expect("leader");
    let leader_k = c.index_of(&leader.id).expect("leader index");
    let victim = (1..=5).find(|k| *k != leader_k && *k != 2).expect("victim");
    let victim_id = c.node_id(victim).expect("id");
    let lost = st["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| {
                    v["nodes"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|x| x == victim_id.as_str()))
                })
                .count()
        })
        .unwrap_or(0);
    let t = now();
    c.kill_node(victim);
    c.wait_for("replaced", WAIT, || {
        let s = json(&c, 2, &["proctor", "status", "--json"])?;
        let svcs = s["services"].as_array().cloned().unwrap_or_default();
        let ok = svcs.iter().all(|v| {
            v["state"] == "converged"
                && v["nodes"]
                    .as_array()
                    .is_some_and(|n| n.iter().all(|x| x != victim_id.as_str()))
        });
        if ok {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    println!(
        "node kill -9 ({lost} instance(s) on it) -> replaced and converged: {:?}",
        t.elapsed()
    );

    // 20 plugins on one node: the agent's memory.
    let host = c.agent(2).addr.ip().to_string();
    // Twenty distinct units on one node: one service per instance, placed by host.
    let text: String = (1..=20)
        .map(|i| {
            service(
                &format!("many{i}"),
                &format!("many{i}_1"),
                &art,
                &format!("count 1; where host == {host:?}"),
            )
        })
        .collect();
    let gen = apply(&c, 2, "many.toml", &text);
    converged(&c, 2, gen, 20);
    let after = rss_kib(pid);
    let procs = json(&c, 2, &["picket", "ps", "--json"]).expect("ps");
    let kids: Vec<u32> = procs
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["kind"] == "plugin" && p["pid"].as_u64().unwrap_or(0) != 0)
                .filter_map(|p| p["pid"].as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let kids_rss: u64 = kids.iter().map(|p| rss_kib(*p)).sum();
    // The other agents went through the same history (the same store writes, the earlier
    // intents) but run no plugin now: the control.
    let others: Vec<String> = (1..=5)
        .filter(|k| *k != 2 && *k != victim)
        .filter_map(|k| {
            c.agent(k)
                .pid()
                .map(|p| format!("node{k} {} KiB", rss_kib(p)))
        })
        .collect();
    println!(
        "agents running no plugin at the same moment: {}",
        others.join(", ")
    );
    println!(
        "node2 agent RSS: {} KiB before any plugin ran, {} KiB with {} plugin children (children: {} KiB in all, {} KiB each)",
        before,
        after,
        kids.len(),
        kids_rss,
        kids_rss / kids.len().max(1) as u64
    );

    drop(c);
    memory_slope(&crux, &galumph);
}

/// One agent alone: its RSS with 0, 20 and 40 plugin children (what each child costs the agent,
/// without the leader's, the store's or the CLI's share).
fn memory_slope(crux: &str, galumph: &str) {
    let mut c = Cluster::new(PathBuf::from(crux), 202, 1, "local");
    c.start_all();
    c.stable_agreement(&[1], Duration::from_secs(1), WAIT);
    c.wait_for("the store", WAIT, || {
        let s = json(&c, 1, &["store", "status", "--json"])?;
        if s["leader_addr"] != "" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let art = json(&c, 1, &["pastiche", "put", galumph, "--json"]).expect("put")["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let pid = c.agent(1).pid().expect("runs");
    let mut line = format!("one agent alone: RSS {} KiB with 0 plugins", rss_kib(pid));
    for n in [20, 40] {
        let text: String = (1..=n)
            .map(|i| service(&format!("m{i}"), &format!("m{i}_1"), &art, "count 1"))
            .collect();
        let gen = apply(&c, 1, &format!("m{n}.toml"), &text);
        converged(&c, 1, gen, n);
        line.push_str(&format!(", {} KiB with {n}", rss_kib(pid)));
    }
    println!("{line}");
}
