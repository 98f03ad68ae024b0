//! End-to-end tests of the service registry (issue 5, item 7) with real `crux agent` processes on
//! loopback: registration through `crux register`, lookups and watches on every node, expiry,
//! leader failover, and the node port's member check.
//!
//! Each test has its own `127.A.B.x` range and port (see `crux_tests::cluster`), and kills only
//! the processes it started: the agents, and the `crux register` sidecars with their commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crux_tests::cluster::{http_get, wait_for, Cluster, Registration};
use serde::Deserialize;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);
/// The registry heartbeat interval of these tests.
const HB: Duration = Duration::from_secs(1);
/// The grace period of these tests (production: at least a minute).
const GRACE: Duration = Duration::from_secs(4);

/// An instance as `crux lookup --json` prints it.
#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
struct Inst {
    id: String,
    api: String,
    inst: String,
    addr: String,
    horde: String,
    node: String,
    state: String,
    health: String,
    live: bool,
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn cluster(test_id: u8, n: usize) -> Cluster {
    let c = Cluster::new(BIN, test_id, n, PRESET);
    for k in 1..=n {
        c.append_config(
            k,
            &format!(
                "[registry]\nheartbeat_interval = \"{}ms\"\ngrace = \"{}ms\"\n",
                HB.as_millis(),
                GRACE.as_millis()
            ),
        );
    }
    c
}

/// `crux lookup SELECTOR --json` on node k: the instances, or none when nothing matches.
fn lookup(c: &Cluster, k: usize, selector: &str) -> Result<Vec<Inst>, String> {
    c.lookup(k, selector)
}

/// `crux services --steward --json` asked on node k: the steward's own table.
fn steward_table(c: &Cluster, k: usize) -> Result<Vec<Inst>, String> {
    let out = c.cli(k, &["services", "--steward", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "node{k}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: bad JSON: {e}"))
}

/// `crux register ... -- sleep 600` on node k for instance `inst` of `api` at the node's address
/// and `port`.
fn register(c: &Cluster, k: usize, api: &str, inst: &str, port: u16) -> Registration {
    c.register(
        k,
        api,
        inst,
        SocketAddr::new(c.agent(k).addr.ip(), port),
        &[],
    )
}

/// The state node k shows for `inst` (None: not listed).
fn state_of(c: &Cluster, k: usize, selector: &str, inst: &str) -> Result<Option<Inst>, String> {
    Ok(lookup(c, k, selector)?.into_iter().find(|i| i.inst == inst))
}

/// Registration, propagation, selector order, watch, expiry (unknown, then gone), the sidecar's
/// deregistration and exit status, and the node port's member check, on five agents.
#[test]
fn registry_on_five_nodes() {
    let mut c = cluster(1, 5);
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    let leader = c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);

    // A watcher on node 5 from the start.
    let watch_out = c.dir().join("watch.out");
    let mut watcher = KillOnDrop(Some(
        c.command()
            .args(["watch", "galumph2", "--json", "--socket"])
            .arg(&c.agent(5).socket)
            .stdout(std::fs::File::create(&watch_out).expect("watch output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start crux watch"),
    ));

    // 1. Registered on node 2: visible on every node within two heartbeat intervals of being
    //    visible on node 2.
    let _nine = register(&c, 2, "galumph2", "galumph2_9", 40009);
    c.wait_for("galumph2_9 live on node 2", CONVERGE, || {
        match state_of(&c, 2, "galumph2", "galumph2_9")? {
            Some(i) if i.live => Ok(()),
            other => Err(format!("node 2 shows {other:?}")),
        }
    });
    let t0 = now();
    c.wait_for("galumph2_9 on every node", CONVERGE, || {
        for k in all {
            if !state_of(&c, k, "galumph2", "galumph2_9")?.is_some_and(|i| i.live) {
                return Err(format!("not yet on node{k}"));
            }
        }
        Ok(())
    });
    let spread = t0.elapsed();
    eprintln!("galumph2_9 reached every node {spread:?} after node 2 listed it");
    assert!(
        spread <= 2 * HB,
        "galumph2_9 took {spread:?} to reach every node (heartbeat interval {HB:?})"
    );

    // 2. galumph2_10 (on node 4) beats galumph2_9 everywhere.
    let mut ten = register(&c, 4, "galumph2", "galumph2_10", 40010);
    c.wait_for("galumph2_10 first on every node", CONVERGE, || {
        for k in all {
            let got = lookup(&c, k, "galumph2")?;
            let names: Vec<&str> = got.iter().map(|i| i.inst.as_str()).collect();
            if names != ["galumph2_10", "galumph2_9"] || !got[0].live {
                return Err(format!("node{k}: {names:?}"));
            }
        }
        Ok(())
    });
    // An exact instance selector picks just that one.
    let exact = lookup(&c, 3, "galumph2_9").expect("lookup");
    assert_eq!(exact.len(), 1);
    assert_eq!(exact[0].inst, "galumph2_9");
    assert_eq!(exact[0].horde, "default");
    assert!(lookup(&c, 3, "nosuchapi").expect("lookup").is_empty());

    // 3. The node port admits members only, over the node plane: a caller whose key the flock
    //    does not list, or that holds another bloc key, gets no connection at all; a member
    //    holding the bloc's key is answered. The leader counts what it refused.
    let leader_k = c.index_of(&leader.id).expect("leader is ours");
    let steward_addr = c.agent(leader_k).grpc;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let table = |t: crux_transport::Transport| {
        rt.block_on(async {
            let ch = t
                .channel(steward_addr, None, Duration::from_secs(5))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut client = crux_proto::grpc::steward::v1::steward_client::StewardClient::new(ch);
            client
                .table(crux_proto::grpc::steward::v1::TableRequest {
                    api: "galumph2".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().instances.len())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    };
    let stranger = crux_transport::NodeIdentity::generate().unwrap();
    let err = table(c.test_transport(stranger, &c.key)).expect_err("a stranger was answered");
    assert!(err.contains("connect"), "{err}");
    let other_key = crux_tests::cluster::keygen(std::path::Path::new(BIN));
    let err = table(c.test_transport(c.node_identity(1), &other_key))
        .expect_err("a caller with another bloc key was answered");
    assert!(err.contains("connect"), "{err}");
    assert_eq!(
        table(c.test_transport(c.node_identity(1), &c.key)),
        Ok(2),
        "a member is answered"
    );
    let leader_http = c.agent(leader_k).http;
    let metrics = http_get(leader_http, "/metrics").expect("metrics");
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("crux_node_plane_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(refused >= 2, "{metrics}");

    // 4. kill -9 of galumph2_10's process: its heartbeats stop; it turns unknown everywhere
    //    (and galumph2_9 is first again), then it is gone after the grace period.
    ten.kill9();
    c.wait_for("galumph2_10 unknown on every node", CONVERGE, || {
        for k in all {
            let got = lookup(&c, k, "galumph2")?;
            let names: Vec<(&str, &str)> = got
                .iter()
                .map(|i| (i.inst.as_str(), i.state.as_str()))
                .collect();
            if names != [("galumph2_9", "running"), ("galumph2_10", "unknown")] {
                return Err(format!("node{k}: {names:?}"));
            }
        }
        Ok(())
    });
    let unknown_at = now();
    c.wait_for("galumph2_10 gone on every node", CONVERGE, || {
        for k in all {
            if state_of(&c, k, "galumph2", "galumph2_10")?.is_some() {
                return Err(format!("still listed on node{k}"));
            }
        }
        Ok(())
    });
    let gone_after = unknown_at.elapsed();
    assert!(
        gone_after + Duration::from_millis(500) >= GRACE,
        "removed {gone_after:?} after turning unknown; grace is {GRACE:?}"
    );

    // 5. The watcher on node 5 saw galumph2_9 and galumph2_10 appear, galumph2_10 turn unknown
    //    and go.
    let text = wait_for(CONVERGE, || {
        let text = std::fs::read_to_string(&watch_out).map_err(|e| e.to_string())?;
        if text.contains("\"remove\":[{") {
            Ok(text)
        } else {
            Err(format!("watch output so far: {text}"))
        }
    })
    .expect("the watcher saw the removal");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let seen = |key: &str, inst: &str, state: Option<&str>| {
        events.iter().any(|e| {
            e[key].as_array().is_some_and(|a| {
                a.iter()
                    .any(|i| i["inst"] == inst && state.is_none_or(|s| i["state"] == s))
            })
        })
    };
    assert!(seen("put", "galumph2_9", Some("running")), "{text}");
    assert!(seen("put", "galumph2_10", Some("running")), "{text}");
    assert!(seen("put", "galumph2_10", Some("unknown")), "{text}");
    assert!(seen("remove", "galumph2_10", None), "{text}");
    let revisions: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().expect("revision"))
        .collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions increase: {revisions:?}"
    );
    watcher.kill();

    // 6. When the command exits, `crux register` deregisters it at once and exits with the
    //    command's status (128 + 9 for a kill -9).
    let mut nine = _nine;
    let pid = c_wait_pid(&nine);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the command");
    let status = nine.wait().expect("wait");
    assert_eq!(status.code(), Some(137), "sidecar exit status {status:?}");
    let t1 = now();
    c.wait_for("galumph2_9 deregistered everywhere", CONVERGE, || {
        for k in all {
            if state_of(&c, k, "galumph2", "galumph2_9")?.is_some() {
                return Err(format!("still listed on node{k}"));
            }
        }
        Ok(())
    });
    assert!(
        t1.elapsed() < GRACE,
        "a deregistration is at once, not an expiry"
    );
}

fn c_wait_pid(s: &Registration) -> i32 {
    wait_for(CONVERGE, || {
        s.command_pid()
            .ok_or_else(|| "the sidecar's command is not running yet".to_string())
    })
    .expect("the sidecar runs its command")
}

/// kill -9 of the leader: lookups on every surviving node answer, without a single failure,
/// throughout; the new steward lists every live instance within three heartbeat intervals and
/// keeps them (the reeves register them again), while the dead node's instance expires.
#[test]
fn leader_crash_keeps_lookups_answering_and_the_new_steward_is_whole() {
    let mut c = cluster(2, 5);
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    let old = c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let dead = c.index_of(&old.id).expect("leader is ours");
    let rest: Vec<usize> = all.iter().copied().filter(|k| *k != dead).collect();
    let mut sidecars = Vec::new();
    for &k in &rest {
        sidecars.push(register(
            &c,
            k,
            "svc",
            &format!("svc_{k}"),
            41000 + k as u16,
        ));
    }
    sidecars.push(register(&c, dead, "onleader", "onleader_1", 41100));
    let want: Vec<String> = rest.iter().map(|k| format!("svc_{k}")).collect();
    let live_svcs = |list: &[Inst]| -> Vec<String> {
        let mut v: Vec<String> = list
            .iter()
            .filter(|i| i.api == "svc" && i.live)
            .map(|i| i.inst.clone())
            .collect();
        v.sort();
        v
    };
    c.wait_for("every instance live on every node", CONVERGE, || {
        for k in all {
            if live_svcs(&lookup(&c, k, "svc")?) != want {
                return Err(format!("node{k} not there yet"));
            }
            if !state_of(&c, k, "onleader", "onleader_1")?.is_some_and(|i| i.live) {
                return Err(format!("node{k} lacks onleader_1"));
            }
        }
        Ok(())
    });

    // Poll lookups on every survivor, all through the failover.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let bin = PathBuf::from(BIN);
    let sockets: Vec<PathBuf> = rest.iter().map(|k| c.agent(*k).socket.clone()).collect();
    let poller = {
        let (stop, polls, want) = (stop.clone(), polls.clone(), want.clone());
        std::thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for s in &sockets {
                    let out = Command::new(&bin)
                        .args(["lookup", "svc", "--json", "--socket"])
                        .arg(s)
                        .env_remove("CRUX_SOCKET")
                        .output()
                        .expect("run crux lookup");
                    polls.fetch_add(1, Ordering::SeqCst);
                    let ok = out.status.success()
                        && serde_json::from_slice::<Vec<Inst>>(&out.stdout)
                            .map(|l| {
                                let mut v: Vec<String> = l
                                    .iter()
                                    .filter(|i| i.live)
                                    .map(|i| i.inst.clone())
                                    .collect();
                                v.sort();
                                v == want
                            })
                            .unwrap_or(false);
                    if !ok {
                        failures.push(format!(
                            "{}: {} {}",
                            s.display(),
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
            }
            failures
        })
    };

    c.kill9(dead);
    let new = c.wait_for("a new leader among the survivors", CONVERGE, || {
        let l = c.agreement(&rest)?;
        if l.id == old.id {
            return Err("still following the dead leader".into());
        }
        Ok(l)
    });
    let elected = now();
    let asker = rest[0];
    c.wait_for(
        "the new steward lists every live instance",
        CONVERGE,
        || {
            let t = steward_table(&c, asker)?;
            if live_svcs(&t) != want {
                return Err(format!("steward lists {:?}", live_svcs(&t)));
            }
            Ok(())
        },
    );
    let whole = elected.elapsed();
    eprintln!(
        "new leader term {}: its steward listed every live instance {whole:?} after the survivors agreed on it",
        new.term
    );
    assert!(
        whole <= 3 * HB,
        "the new steward (term {}) took {whole:?} to list every live instance",
        new.term
    );
    // Past the time a seeded entry is kept, they are still there: the reeves registered them
    // again. The crashed node's instance turned unknown.
    let hold = now();
    c.wait_for("the dead node's instance unknown or gone", CONVERGE, || {
        let t = steward_table(&c, asker)?;
        match t.iter().find(|i| i.inst == "onleader_1") {
            Some(i) if i.state != "unknown" => Err(format!("onleader_1 is {}", i.state)),
            _ => Ok(()),
        }
    });
    // Every look at the steward's table over six heartbeat intervals lists them all live.
    while hold.elapsed() < 6 * HB {
        let t = steward_table(&c, asker).expect("steward table");
        assert_eq!(live_svcs(&t), want, "re-registered instances stay live");
        std::thread::sleep(Duration::from_millis(200));
    }

    stop.store(true, Ordering::SeqCst);
    let failures = poller.join().expect("poller");
    let n = polls.load(Ordering::SeqCst);
    eprintln!(
        "{n} lookups on the survivors during the failover, {} failed",
        failures.len()
    );
    assert!(n >= 4 * rest.len(), "only {n} lookups made");
    assert!(
        failures.is_empty(),
        "{} of {n} lookups failed during the failover: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    drop(sidecars);
}

/// A child process killed on drop.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}
