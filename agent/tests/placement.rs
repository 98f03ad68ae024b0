//! End-to-end tests of picket and proctor/dean (issue 8) with real `crux agent` processes and the
//! example plugin `galumph` on loopback: an intent "count 3; distinct host" converges to three
//! instances on three nodes; a node's kill -9 has its instance replaced elsewhere; the leader's
//! kill -9 leaves the new proctor on the same generation with the same instances; an agent's
//! kill -9 and restart re-adopts its running plugins; a live update
//! galumph2_3 → galumph2_4 never leaves lookups empty; a plugin that exits at once is reported
//! failed and is not restarted forever.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crux_tests::cluster::Cluster;
use serde::Deserialize;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(60);

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// The example plugin, built next to `crux` (built here when a partial build lacks it).
fn galumph() -> PathBuf {
    let dir = Path::new(BIN).parent().expect("bin dir");
    let exe = dir.join("galumph");
    if !exe.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = std::process::Command::new(cargo)
            .args(["build", "-p", "galumph", "--bin", "galumph"])
            .status()
            .expect("cargo build -p galumph");
        assert!(st.success(), "building galumph failed");
    }
    assert!(exe.exists(), "no galumph binary at {}", exe.display());
    exe
}

#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
struct Service {
    horde: String,
    api: String,
    inst: String,
    state: String,
    desired: u32,
    running: u32,
    nodes: Vec<String>,
    message: String,
}

#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
struct Status {
    generation: u64,
    leader: String,
    term: u64,
    services: Vec<Service>,
}

#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
struct Proc {
    name: String,
    kind: String,
    api: String,
    inst: String,
    state: String,
    pid: u32,
    restarts: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
struct Inst {
    api: String,
    inst: String,
    addr: String,
    node: String,
    live: bool,
}

fn run_json<T: serde::de::DeserializeOwned>(
    c: &Cluster,
    k: usize,
    args: &[&str],
) -> Result<T, String> {
    let out = c.cli(k, args);
    if !out.status.success() {
        return Err(format!(
            "node{k}: crux {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: bad JSON: {e}"))
}

fn status(c: &Cluster, k: usize) -> Result<Status, String> {
    run_json(c, k, &["proctor", "status", "--json"])
}

/// Service `api` of a status.
fn find(s: &Status, api: &str) -> Result<Service, String> {
    s.services
        .iter()
        .find(|v| v.api == api)
        .cloned()
        .ok_or_else(|| format!("{api} not in {s:?}"))
}

fn ps(c: &Cluster, k: usize) -> Result<Vec<Proc>, String> {
    run_json(c, k, &["picket", "ps", "--json"])
}

/// Instances of api galumph2 that node k's lookup returns (none: empty).
fn lookup(c: &Cluster, k: usize) -> Result<Vec<Inst>, String> {
    c.lookup(k, "api:galumph2")
}

fn intent(services: &[(&str, &str, &str, &str)], artifact: &str) -> String {
    let mut t = String::new();
    for (api, inst, function, placement) in services {
        t.push_str(&format!(
            "[[service]]\napi = {api:?}\ninst = {inst:?}\nartifact = {artifact:?}\n\
             function = {function:?}\nplacement = {placement:?}\n\n"
        ));
    }
    t
}

fn apply(c: &Cluster, k: usize, text: &str) -> Result<u64, String> {
    let file = c.dir().join(format!("intent-{}.toml", text.len()));
    std::fs::write(&file, text).expect("write intent");
    #[derive(Deserialize)]
    struct Applied {
        generation: u64,
    }
    let f = file.display().to_string();
    run_json::<Applied>(c, k, &["proctor", "apply", &f, "--json"]).map(|a| a.generation)
}

/// Waits until the proctor (asked on node k) reports `api` converged on `inst` at `generation`
/// or later; returns the service.
fn converged(c: &Cluster, k: usize, api: &str, inst: &str, generation: u64) -> Service {
    c.wait_for(&format!("{api} converged on {inst}"), CONVERGE, || {
        let s = status(c, k)?;
        let svc = find(&s, api)?;
        if s.generation >= generation && svc.inst == inst && svc.state == "converged" {
            Ok(svc)
        } else {
            Err(format!("{s:?}"))
        }
    })
}

/// Node indexes (1-based) of node ids.
fn indexes(c: &Cluster, ids: &[String]) -> BTreeSet<usize> {
    ids.iter()
        .map(|id| c.index_of(id).expect("a known node id"))
        .collect()
}

/// Plugins with pids that node k's picket runs for `inst`.
fn plugin_pids(c: &Cluster, k: usize, inst: &str) -> Vec<u32> {
    ps(c, k)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.kind == "plugin" && p.inst == inst && p.pid != 0)
        .map(|p| p.pid)
        .collect()
}

fn cluster(test_id: u8) -> Cluster {
    let c = Cluster::new(BIN, test_id, 5, PRESET);
    for k in 1..=5 {
        c.append_config(
            k,
            "[registry]\nheartbeat_interval = \"1s\"\ngrace = \"4s\"\n\
             [store]\nvoter_grace = \"3s\"\n\
             [picket]\ncrash_loop = 3\nbackoff = \"100ms\"\nstop_grace = \"2s\"\nfailed_hold = \"10m\"\n",
        );
    }
    c
}

fn store_ready(c: &Cluster) {
    c.wait_for("the store's voters", CONVERGE, || {
        let out = c.cli(1, &["store", "status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let voters = v["voters"].as_array().map(|a| a.len()).unwrap_or(0);
        if voters == 3 && v["leader_addr"].as_str().is_some_and(|s| !s.is_empty()) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
}

fn put(c: &Cluster, k: usize, file: &Path) -> String {
    #[derive(Deserialize)]
    struct Put {
        digest: String,
    }
    let f = file.display().to_string();
    run_json::<Put>(c, k, &["pastiche", "put", &f, "--json"])
        .expect("pastiche put")
        .digest
}

/// Five agents in agreement with their store up, and galumph put into node 1's pastiche: the
/// cluster and the artifact's digest.
fn up(test_id: u8) -> (Cluster, String) {
    let exe = galumph();
    let mut c = cluster(test_id);
    c.start_all();
    c.stable_agreement(&[1, 2, 3, 4, 5], Duration::from_secs(1), CONVERGE);
    store_ready(&c);
    let art = put(&c, 1, &exe);
    (c, art)
}

/// Count 3 distinct host → 3 instances on 3 nodes; a node's kill -9 → replaced; the leader's
/// kill -9 → the new proctor carries on at the same generation; a live update keeps lookups
/// answered.
#[test]
fn intent_converges_survives_node_and_leader_loss_and_updates_live() {
    let (mut c, art) = up(1);
    let all = [1, 2, 3, 4, 5];

    // Apply on node 2; converged with three instances on three nodes.
    let t0 = now();
    let text = intent(
        &[(
            "galumph2",
            "galumph2_3",
            "galumph2_3",
            "count 3; distinct host",
        )],
        &art,
    );
    let generation = apply(&c, 2, &text).expect("apply");
    let svc = converged(&c, 2, "galumph2", "galumph2_3", generation);
    eprintln!(
        "figure: apply -> converged (3 instances): {:?}",
        t0.elapsed()
    );
    let on = indexes(&c, &svc.nodes);
    assert_eq!(on.len(), 3, "{svc:?}");
    assert_eq!(svc.running, 3, "{svc:?}");
    for &k in &on {
        c.wait_for("the plugin healthy in picket ps", CONVERGE, || {
            let procs = ps(&c, k)?;
            procs
                .iter()
                .find(|p| p.inst == "galumph2_3" && p.state == "healthy" && p.pid != 0)
                .cloned()
                .ok_or_else(|| format!("node{k}: {procs:?}"))
        });
    }
    // Every node finds the three instances by api.
    for k in all {
        c.wait_for("three galumph2 instances by lookup", CONVERGE, || {
            let l = lookup(&c, k)?;
            let live: BTreeSet<String> = l
                .iter()
                .filter(|i| i.live)
                .map(|i| i.addr.clone())
                .collect();
            if live.len() == 3 && l.iter().all(|i| i.inst == "galumph2_3") {
                Ok(())
            } else {
                Err(format!("node{k}: {l:?}"))
            }
        });
    }
    // The same intent again: no change, the same generation.
    let out = c.cli(
        3,
        &[
            "proctor",
            "diff",
            &c.dir()
                .join(format!("intent-{}.toml", text.len()))
                .display()
                .to_string(),
        ],
    );
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no change"),
        "{out:?}"
    );

    // kill -9 of a node (not the leader) that runs one: replaced elsewhere.
    let leader = c.agreement(&all).expect("leader");
    let leader_k = c.index_of(&leader.id).expect("leader index");
    let victim = *on
        .iter()
        .find(|k| **k != leader_k)
        .expect("a non-leader runs one");
    let t0 = now();
    c.kill_node(victim);
    let victim_id = c.node_id(victim).expect("id");
    let svc = c.wait_for("the instance replaced", CONVERGE, || {
        let s = status(&c, leader_k)?;
        let v = find(&s, "galumph2")?;
        if v.state == "converged" && !v.nodes.contains(&victim_id) && v.nodes.len() == 3 {
            Ok(v)
        } else {
            Err(format!("{v:?}"))
        }
    });
    eprintln!(
        "figure: node kill -9 -> replaced and converged: {:?}",
        t0.elapsed()
    );
    assert_eq!(indexes(&c, &svc.nodes).len(), 3);
    // The node comes back (its plugins died with it) before the next loss.
    c.start(victim);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);

    // kill -9 of the leader: the new proctor reports the same generation, converged, and the
    // surviving instances were not restarted.
    let leader = c.agreement(&all).expect("leader");
    let leader_k = c.index_of(&leader.id).expect("leader index");
    let before: BTreeMap<usize, Vec<u32>> = all
        .iter()
        .filter(|k| **k != leader_k)
        .map(|k| (*k, plugin_pids(&c, *k, "galumph2_3")))
        .collect();
    c.kill_node(leader_k);
    let rest: Vec<usize> = all.iter().copied().filter(|k| *k != leader_k).collect();
    let asker = rest[0];
    let old_leader = leader.id.clone();
    c.wait_for(
        "a new proctor at the same generation, converged",
        CONVERGE,
        || {
            let s = status(&c, asker)?;
            let v = find(&s, "galumph2")?;
            if s.leader != old_leader
                && s.generation == generation
                && v.state == "converged"
                && !v.nodes.contains(&old_leader)
            {
                Ok(())
            } else {
                Err(format!("{s:?}"))
            }
        },
    );
    for (k, pids) in &before {
        if !pids.is_empty() {
            assert_eq!(
                &plugin_pids(&c, *k, "galumph2_3"),
                pids,
                "node{k} restarted its plugin"
            );
        }
    }
    c.start(leader_k);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);

    // kill -9 of an agent alone (its plugins live on): the restarted agent re-adopts them, with
    // the same pids, and nothing is started twice.
    let s = status(&c, asker).expect("status");
    let svc = s
        .services
        .iter()
        .find(|v| v.api == "galumph2")
        .expect("galumph2");
    let host = *indexes(&c, &svc.nodes)
        .iter()
        .next()
        .expect("a node runs one");
    let pids = plugin_pids(&c, host, "galumph2_3");
    assert_eq!(pids.len(), 1, "node{host}: {pids:?}");
    c.kill9(host);
    c.start(host);
    c.wait_for("the plugin re-adopted", CONVERGE, || {
        let procs = ps(&c, host)?;
        let mine: Vec<&Proc> = procs.iter().filter(|p| p.inst == "galumph2_3").collect();
        if mine.len() == 1 && mine[0].pid == pids[0] && mine[0].state == "healthy" {
            Ok(())
        } else {
            Err(format!("node{host}: {procs:?}"))
        }
    });
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    converged(&c, asker, "galumph2", "galumph2_3", generation);
    assert_eq!(plugin_pids(&c, host, "galumph2_3"), pids);

    // Live update galumph2_3 -> galumph2_4 with a lookup every 100 ms that is never empty.
    let stop = Arc::new(AtomicBool::new(false));
    let (empty, asked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looker = {
        let (stop, empty, asked) = (stop.clone(), empty.clone(), asked.clone());
        let socket = c.agent(asker).socket.clone();
        let bin = BIN.to_string();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new(&bin)
                    .args(["lookup", "api:galumph2", "--json", "--socket"])
                    .arg(&socket)
                    .env_remove("CRUX_SOCKET")
                    .output()
                    .expect("lookup");
                asked.fetch_add(1, Ordering::Relaxed);
                let live = out.status.success()
                    && serde_json::from_slice::<Vec<Inst>>(&out.stdout)
                        .map(|v| v.iter().any(|i| i.live))
                        .unwrap_or(false);
                if !live {
                    empty.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let t0 = now();
    let text = intent(
        &[(
            "galumph2",
            "galumph2_4",
            "galumph2_4",
            "count 3; distinct host",
        )],
        &art,
    );
    let g2 = apply(&c, 3, &text).expect("apply the update");
    assert!(g2 > generation);
    converged(&c, 3, "galumph2", "galumph2_4", g2);
    eprintln!("figure: live update -> converged: {:?}", t0.elapsed());
    c.wait_for("lookups answer galumph2_4 only", CONVERGE, || {
        let l = lookup(&c, asker)?;
        if !l.is_empty() && l.iter().all(|i| i.inst == "galumph2_4") {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    });
    stop.store(true, Ordering::Relaxed);
    looker.join().expect("looker");
    let (empty, asked) = (empty.load(Ordering::Relaxed), asked.load(Ordering::Relaxed));
    eprintln!("live update: {asked} lookups, {empty} empty");
    assert!(asked >= 5, "too few lookups ({asked})");
    assert_eq!(
        empty, 0,
        "{empty} of {asked} lookups found no live galumph2 during the update"
    );
    for k in all {
        assert!(
            plugin_pids(&c, k, "galumph2_3").is_empty(),
            "node{k} still runs galumph2_3"
        );
    }
}

/// A plugin that exits at once: reported failed, and not restarted forever; a unit whose muster
/// entry is gone is not started.
#[test]
fn a_crashing_plugin_is_reported_failed_and_left_alone() {
    let (mut c, art) = up(2);
    let all = [1, 2, 3, 4, 5];
    let text = intent(&[("crasher1", "crasher1_1", "crash", "count 2")], &art);
    let generation = apply(&c, 1, &text).expect("apply");
    let s = c.wait_for("crasher1 failed", CONVERGE, || {
        let s = status(&c, 1)?;
        let v = find(&s, "crasher1")?;
        if s.generation == generation && v.state == "failed" {
            Ok(v)
        } else {
            Err(format!("{s:?}"))
        }
    });
    assert_eq!(s.running, 0, "{s:?}");
    // Restarts stop: once the attempts under way have failed too, the unit is assigned to no
    // node, every node's picket runs nothing, and it stays so while the proctor keeps
    // reconciling (three proctor rounds and more).
    let restarts = |c: &Cluster| -> Result<usize, String> {
        let mut n = 0;
        for k in all {
            n += ps(c, k)?
                .iter()
                .filter(|p| p.kind == "plugin" && p.api == "crasher1" && p.pid != 0)
                .count();
        }
        Ok(n)
    };
    c.wait_for(
        "crasher1 assigned nowhere and running nowhere",
        CONVERGE,
        || {
            let s = status(&c, 1)?;
            let v = find(&s, "crasher1")?;
            if !v.nodes.is_empty() {
                return Err(format!("assigned: {v:?}"));
            }
            match restarts(&c)? {
                0 => Ok(()),
                n => Err(format!("{n} running")),
            }
        },
    );
    let until = now() + Duration::from_secs(5);
    while now() < until {
        assert_eq!(
            restarts(&c).expect("ps"),
            0,
            "a failed plugin was started again"
        );
        let s = status(&c, 1).expect("status");
        let v = s
            .services
            .iter()
            .find(|v| v.api == "crasher1")
            .expect("crasher1");
        assert_eq!(v.state, "failed", "{s:?}");
        assert!(
            v.nodes.is_empty(),
            "a failed plugin was placed again: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Bad input changes nothing: a placement error names line and column, and the intent stays.
    let bad = intent(
        &[("crasher1", "crasher1_1", "crash", "count 2; distinct")],
        &art,
    );
    let file = c.dir().join("bad.toml");
    std::fs::write(&file, bad).expect("write");
    let out = c.cli(1, &["proctor", "apply", &file.display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1, column"), "{err}");
    assert_eq!(status(&c, 1).expect("status").generation, generation);

    // Only a muster entry can name an executable: with its entry removed, a unit that has to
    // start anew (its node died) is not started; with the entry back, it is.
    let leader = c.agreement(&all).expect("leader");
    let leader_k = c.index_of(&leader.id).expect("leader index");
    let leader_ip = c.agent(leader_k).addr.ip().to_string();
    let solo = format!("count 1; where host != {leader_ip:?}");
    let text = intent(
        &[
            ("crasher1", "crasher1_1", "crash", "count 2"),
            ("solo1", "solo1_1", "galumph2_3", &solo),
        ],
        &art,
    );
    let generation = apply(&c, leader_k, &text).expect("apply");
    let svc = converged(&c, leader_k, "solo1", "solo1_1", generation);
    let first = *indexes(&c, &svc.nodes).iter().next().expect("placed");
    let out = c.cli(
        leader_k,
        &["muster", "rm", "--api", "solo1", "--inst", "solo1_1"],
    );
    assert!(out.status.success(), "{out:?}");
    c.kill_node(first);
    let first_id = c.node_id(first).expect("id");
    let next = c.wait_for("solo1 assigned to another node", CONVERGE, || {
        let s = status(&c, leader_k)?;
        let v = find(&s, "solo1")?;
        match v.nodes.as_slice() {
            [n] if *n != first_id => Ok(c.index_of(n).expect("known")),
            _ => Err(format!("{v:?}")),
        }
    });
    let until = now() + Duration::from_secs(3);
    while now() < until {
        assert!(
            plugin_pids(&c, next, "solo1_1").is_empty(),
            "node{next} started solo1_1 without a muster entry"
        );
        let s = status(&c, leader_k).expect("status");
        let v = s.services.iter().find(|v| v.api == "solo1").expect("solo1");
        assert_eq!((v.running, v.state.as_str()), (0, "progressing"), "{v:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = c.cli(
        leader_k,
        &[
            "muster",
            "add",
            "--api",
            "solo1",
            "--inst",
            "solo1_1",
            "--file",
            &art,
            "--function",
            "galumph2_3",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let svc = converged(&c, leader_k, "solo1", "solo1_1", generation);
    assert_eq!(indexes(&c, &svc.nodes), [next].into_iter().collect());
    assert_eq!(plugin_pids(&c, next, "solo1_1").len(), 1);
}
