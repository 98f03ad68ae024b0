//! Issue 18, item 1, "Readiness is the truth": an agent reports ready only once every step of its
//! bootstrap serves — the store only once it takes writes — so a command that needs the store
//! succeeds the moment any node says ready; and a command run before that waits for what it
//! needs instead of failing on the race.
//!
//! Twenty fresh flocks of three, one after the other: in each, `crux proctor apply` with no wait
//! at all (`--wait 0s`) on the first node whose `/ready` turns 200, and a `crux muster add` run
//! the moment the agents are started (before any socket exists) with the default wait.

use std::process::Output;
use std::time::{Duration, Instant};

use crux_tests::cluster::{http_get, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
const ROUNDS: u8 = 20;

#[allow(clippy::disallowed_methods)] // a test harness may read the clock
fn now() -> Instant {
    Instant::now()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Fresh flocks started at once: four at a time, each on its own addresses, so that the twenty
/// rounds take about a fifth of the time they would one after another.
const AT_ONCE: u8 = 4;

#[test]
fn proctor_apply_right_after_the_first_ready_succeeds_on_twenty_fresh_flocks() {
    let started = now();
    let workers: Vec<_> = (0..AT_ONCE)
        .map(|w| {
            std::thread::spawn(move || {
                (1..=ROUNDS)
                    .filter(|r| r % AT_ONCE == w)
                    .map(one_round)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut to_ready = Vec::new();
    for w in workers {
        match w.join() {
            Ok(times) => to_ready.extend(times),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let slowest = to_ready.iter().max().copied().unwrap_or_default();
    let mean = to_ready.iter().sum::<Duration>() / u32::from(ROUNDS);
    eprintln!(
        "{ROUNDS} fresh flocks of 3 ({AT_ONCE} at a time): proctor apply succeeded right after \
         the first /ready 200 every time; start to first ready: mean {mean:.1?}, slowest \
         {slowest:.1?}; total {:.1?}",
        started.elapsed()
    );
}

/// One fresh flock of 3: a `muster add` started with the agents waits and succeeds, and
/// `proctor apply --wait 0s` on the first node whose `/ready` turns 200 succeeds at once. The
/// time from the start to that first 200.
fn one_round(round: u8) -> Duration {
    let mut c = Cluster::new(BIN, round, 3, PRESET);
    let intent = c.dir().join("empty-intent.toml");
    std::fs::write(&intent, "").expect("write the intent");
    // Started before any agent runs: waits (default --wait) for the socket, then the store.
    let early_k = usize::from(round % 3) + 1;
    let mut early = c.command();
    early
        .args(["muster", "add", "--api", "ready1", "--inst", "ready1_1"])
        .args(["--file", &format!("sha256:{}", "ab".repeat(32))])
        .args(["--function", "f", "--socket"])
        .arg(&c.agent(early_k).socket);
    let t0 = now();
    c.start_all();
    let early = std::thread::spawn(move || early.output().expect("run crux muster add"));

    let ready_k = c.wait_for("a first /ready 200", CONVERGE, || {
        for k in 1..=3 {
            let body = http_get(c.agent(k).http, "/ready").map_err(|e| e.to_string())?;
            if body.starts_with("HTTP/1.1 200") {
                return Ok(k);
            }
        }
        Err("no node ready yet".into())
    });
    let t_ready = t0.elapsed();
    let out = c.cli(
        ready_k,
        &[
            "proctor",
            "apply",
            "--wait",
            "0s",
            &intent.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "round {round}: proctor apply on node{ready_k} right after its /ready 200 failed: \
         {}\n{}",
        stderr(&out),
        c.logs(30)
    );
    let early = early.join().expect("the early command's thread");
    assert!(
        early.status.success(),
        "round {round}: muster add on node{early_k}, started with the agents, failed: {}\n{}",
        stderr(&early),
        c.logs(30)
    );
    let waited = stderr(&early);
    assert!(
        waited.is_empty() || waited.contains("waiting for "),
        "round {round}: the early command's progress lines: {waited}"
    );
    t_ready
}

/// `/ready` until it is 503 and `want` is in its body (or 200 when `want` is empty); the body.
fn ready_body(c: &Cluster, k: usize, want: &str) -> String {
    let http = c.agent(k).http;
    c.wait_for(
        &format!("node{k}'s /ready to say {want:?}"),
        CONVERGE,
        || {
            let body = http_get(http, "/ready?verbose").map_err(|e| e.to_string())?;
            let ok = if want.is_empty() {
                body.starts_with("HTTP/1.1 200")
            } else {
                body.starts_with("HTTP/1.1 503") && body.contains(want)
            };
            if ok {
                Ok(body)
            } else {
                Err(body)
            }
        },
    )
}

fn muster_add(c: &Cluster, k: usize, inst: &str, wait: &str) -> (Output, Duration) {
    let file = format!("sha256:{}", "ab".repeat(32));
    let t = now();
    let out = c.cli(
        k,
        &[
            "muster",
            "add",
            "--api",
            "ready2",
            "--inst",
            inst,
            "--file",
            &file,
            "--function",
            "f",
            "--wait",
            wait,
        ],
    );
    (out, t.elapsed())
}

/// A store that cannot take writes is named as what is missing: once ready, a node whose two
/// fellow voters die is *degraded* ("no quorum possible: 1 of 3 voters reachable"), and a command
/// does not wait for that outage; restarted alone it is *starting* with the same reason, and a
/// command waits for it only up to its `--wait`, then fails naming it; once a second voter is
/// back, the same command waits for the election and succeeds. `/ready?verbose` lists every step
/// with its phase and for how long.
#[test]
fn a_store_without_a_quorum_is_named_as_what_is_missing() {
    let mut c = Cluster::new(BIN, 101, 3, PRESET);
    c.start_all();
    for k in 1..=3 {
        ready_body(&c, k, "");
    }
    c.kill9(2);
    c.kill9(3);
    let body = ready_body(
        &c,
        1,
        "step store degraded: no quorum possible: 1 of 3 voters reachable",
    );
    for step in [
        "flock", "reeve", "steward", "store", "picket", "proctor", "pastiche",
    ] {
        assert!(body.contains(&format!("\n  {step:<8} ")), "{step}: {body}");
    }
    assert!(body.contains("  store    degraded for "), "{body}");
    // An outage, not a start: not waited for; the store's own answer comes at once.
    let (out, took) = muster_add(&c, 1, "ready2_1", "30s");
    assert!(!out.status.success(), "a write without a quorum succeeded");
    assert!(stderr(&out).contains("no quorum"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // Restarted alone: starting, for the same reason; waited for up to --wait only.
    c.kill9(1);
    c.start(1);
    ready_body(
        &c,
        1,
        "step store starting: no quorum possible: 1 of 3 voters reachable",
    );
    let (out, took) = muster_add(&c, 1, "ready2_2", "2s");
    assert!(!out.status.success(), "a write without a quorum succeeded");
    let err = stderr(&out);
    assert!(
        err.contains(
            "the store is not ready after 2s: no quorum possible: 1 of 3 voters reachable"
        ),
        "{err}"
    );
    assert!(err.contains("waiting for the store: "), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "took {took:?}"
    );

    // A second voter back: the command waits for the election and succeeds.
    c.start(2);
    let (out, took) = muster_add(&c, 1, "ready2_3", "30s");
    assert!(
        out.status.success(),
        "after {took:?}: {}\n{}",
        stderr(&out),
        c.logs(30)
    );
    ready_body(&c, 1, "");
    let out = c.cli(1, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["ready"], true, "{v}");
    let store = v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == "store")
        .expect("the store step")
        .clone();
    assert_eq!(store["phase"], "ready", "{store}");
    assert!(
        store["phase_detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("takes writes: leader ")),
        "{store}"
    );
}
