//! Catalyst durable topics end to end (issue 16, items 7-8): ONE conformance suite run on real
//! `crux agent` processes against both backends — standalone (the agent's own segment logs)
//! and the NATS pass-through (a real `nats-server -js` this test starts on a free loopback port
//! and kills on drop; without the binary that half prints SKIPPED). The suite checks, through
//! `crux topic` and the client library alike: offsets in order, `--from`, consumer groups that
//! resume from their committed offset (and a subscriber killed mid-stream that resumes
//! at-least-once), a subscriber that waits for new messages, one that goes away (counted out),
//! one that takes nothing while 64 MiB are published (the agent does not grow: backpressure),
//! retention by size, and bad input (unknown topic, oversized message, malformed offset, offset
//! past the end, bad names) refused with a clear message, a distinct exit code and nothing
//! changed. The NATS half also stops the server in the middle: publishes fail (unacknowledged)
//! while it is away, the agent reconnects with back-off when it is back, nothing acknowledged
//! is lost and an open subscription carries on.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crux_catalyst::client::Topics;
use crux_catalyst::Start;
use crux_tests::cluster::{wait_for, Cluster};

#[allow(dead_code)] // the store's helpers are not all used here
mod common;
use common::runtime;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const CONVERGE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(20);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `crux topic ARGS` on node k.
fn topic(c: &Cluster, k: usize, args: &[&str]) -> Out {
    let mut all = vec!["topic"];
    all.extend_from_slice(args);
    let o = c.cli(k, &all);
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `crux topic pub TOPIC -` with `lines` on stdin.
fn pub_stdin(c: &Cluster, k: usize, t: &str, lines: &str) -> Out {
    let mut child = c
        .command()
        .args(["topic", "pub", t, "-", "--socket"])
        .arg(&c.agent(k).socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("crux topic pub");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[derive(serde::Deserialize, Debug, Clone)]
struct TopicJson {
    name: String,
    first_offset: u64,
    next_offset: u64,
    bytes: u64,
    groups: std::collections::BTreeMap<String, u64>,
}

fn ls(c: &Cluster, k: usize) -> Result<Vec<TopicJson>, String> {
    let o = topic(c, k, &["ls", "--json"]);
    if o.code != 0 {
        return Err(o.stderr);
    }
    serde_json::from_str(&o.stdout).map_err(|e| format!("{e}: {}", o.stdout))
}

fn get(c: &Cluster, k: usize, name: &str) -> Result<TopicJson, String> {
    ls(c, k)?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("no topic {name}"))
}

/// The resident memory of process `pid`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// A `nats-server -js` on a free loopback port with its store in a temp dir; killed on drop.
struct Nats {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    fn find() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    }

    fn start() -> Option<Nats> {
        let bin = Nats::find()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Nats {
            bin,
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.run();
        Some(n)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_for(WAIT, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .expect("nats-server listens");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One agent, with `[catalyst] backend` set when `backend` is given, serving.
fn agent(test_id: u8, n: usize, backend: Option<&str>) -> Cluster {
    let mut c = Cluster::new(BIN, test_id, n, "local");
    if let Some(b) = backend {
        for k in 1..=n {
            c.append_config(k, &format!("\n[catalyst]\nbackend = \"{b}\"\n"));
        }
    }
    c.start_all();
    let all: Vec<usize> = (1..=n).collect();
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    for k in all {
        c.wait_for("catalyst serving", CONVERGE, || ls(&c, k).map(|_| ()));
    }
    c
}

/// The conformance suite, on node k of `c`. The same for every backend.
fn conformance(c: &Cluster, k: usize) {
    let rt = runtime();
    let socket = c.agent(k).socket.clone();
    let mut client = rt.block_on(Topics::connect(&socket)).expect("client");

    // Create, list, create again.
    let o = topic(c, k, &["create", "orders"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let t = get(c, k, "orders").unwrap();
    assert_eq!((t.first_offset, t.next_offset), (0, 0));
    let o = topic(c, k, &["create", "orders"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert!(o.stderr.contains("exists already"), "{}", o.stderr);

    // Publish: one message, stdin lines, a batch through the library; offsets in order.
    let o = topic(c, k, &["pub", "orders", "first"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "published 1 message to orders at offset 0");
    let o = pub_stdin(c, k, "orders", "a\nb\nc\n");
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.trim(),
        "published 3 message(s) to orders at offsets 1..=3"
    );
    let batch: Vec<Vec<u8>> = (4..104).map(|i| format!("m{i}").into_bytes()).collect();
    let offsets = rt.block_on(client.publish("orders", batch)).unwrap();
    assert_eq!(offsets, (4..104).collect::<Vec<u64>>());
    let want: Vec<String> = ["first", "a", "b", "c"]
        .into_iter()
        .map(String::from)
        .chain((4..104).map(|i| format!("m{i}")))
        .collect();

    // Read back, from the start and from an offset.
    let o = topic(c, k, &["sub", "orders", "--count", "104"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want);
    let o = topic(
        c,
        k,
        &["sub", "orders", "--from", "2", "--count", "2", "--json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["offset"].as_u64(), lines[0]["payload"].as_str()),
        (Some(2), Some("b"))
    );
    assert_eq!(
        (lines[1]["offset"].as_u64(), lines[1]["payload"].as_str()),
        (Some(3), Some("c"))
    );
    assert!(lines[0]["time_ms"].as_u64().unwrap() > 1_600_000_000_000);

    // Consumer groups: each resumes from its own committed offset.
    let o = topic(
        c,
        k,
        &["sub", "orders", "--group", "billing", "--count", "10"],
    );
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want[..10]);
    let o = topic(
        c,
        k,
        &["sub", "orders", "--group", "billing", "--count", "5"],
    );
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want[10..15]);
    let o = topic(c, k, &["sub", "orders", "--group", "audit", "--count", "3"]);
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want[..3]);
    let t = get(c, k, "orders").unwrap();
    assert_eq!(t.groups.get("billing"), Some(&15));
    assert_eq!(t.groups.get("audit"), Some(&3));
    // A commit by hand moves the group.
    let o = topic(c, k, &["commit", "orders", "audit", "100"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = topic(c, k, &["sub", "orders", "--group", "audit", "--count", "4"]);
    assert_eq!(o.stdout.lines().collect::<Vec<_>>(), want[100..104]);

    // A group member killed mid-stream: what it had committed holds; the next one resumes there
    // (at-least-once: nothing it had not committed is skipped).
    let mut sub = c
        .command()
        .args(["topic", "sub", "orders", "--group", "crashy", "--socket"])
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_for("the crashy group committed everything", WAIT, || {
        let t = get(c, k, "orders")?;
        match t.groups.get("crashy") {
            Some(104) => Ok(()),
            other => Err(format!("crashy at {other:?}")),
        }
    });
    let _ = sub.kill();
    let _ = sub.wait();
    rt.block_on(client.publish("orders", vec![b"after".to_vec()]))
        .unwrap();
    let o = topic(
        c,
        k,
        &["sub", "orders", "--group", "crashy", "--count", "1"],
    );
    assert_eq!(o.stdout.trim(), "after");

    // A subscriber waiting at the end gets a new message; one that goes away is counted out.
    rt.block_on(async {
        let mut s = client
            .subscribe("orders", Start::Latest, None)
            .await
            .unwrap();
        let mut publisher = client.clone();
        let sent = publisher
            .publish("orders", vec![b"live".to_vec()])
            .await
            .unwrap();
        let got = tokio::time::timeout(WAIT, s.message())
            .await
            .expect("a new message within the deadline")
            .unwrap()
            .unwrap();
        assert_eq!(got.messages.len(), 1);
        assert_eq!(got.messages[0].offset, sent[0]);
        assert_eq!(got.messages[0].payload, b"live");
    });
    // That subscription was dropped at the end of the block: the agent counts it out (asked
    // on the same connection, so that the client's runtime runs while it is told).
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let t = client.get("orders").await.unwrap().unwrap();
            if t.subscribers == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} subscribers left",
                t.subscribers
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Bad input: a clear message, a distinct exit code, nothing changed.
    let before = get(c, k, "orders").unwrap();
    let o = topic(c, k, &["pub", "nope", "x"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(o.stderr.contains("no topic \"nope\""), "{}", o.stderr);
    let o = topic(c, k, &["sub", "nope"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    let big = vec![0u8; crux_catalyst::MESSAGE_BYTES_MAX + 1];
    let e = rt
        .block_on(client.publish("orders", vec![b"ok".to_vec(), big]))
        .unwrap_err();
    assert!(e.to_string().contains("at most 1048576 (1 MiB)"), "{e}");
    for from in ["abc", "-1", "1.5", ""] {
        let o = topic(c, k, &["sub", "orders", &format!("--from={from}")]);
        assert_eq!(o.code, 2, "--from {from}: {}", o.stderr);
        assert!(o.stderr.contains("is not an offset"), "{}", o.stderr);
    }
    let o = topic(c, k, &["sub", "orders", "--from", "999999"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("past the end"), "{}", o.stderr);
    let o = topic(c, k, &["commit", "orders", "g", "999999"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = topic(c, k, &["create", "bad.name"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("only letters, digits"), "{}", o.stderr);
    let o = topic(
        c,
        k,
        &["pub", "orders", "x", "--socket", "/nonexistent/sock"],
    );
    assert_ne!(o.code, 0);
    let after = get(c, k, "orders").unwrap();
    assert_eq!(after.next_offset, before.next_offset);
    assert_eq!(after.groups, before.groups);
    assert!(get(c, k, "bad.name").is_err() && get(c, k, "nope").is_err());

    // Retention by size: a 4 MiB topic given 12 MiB keeps at most 4 MiB, the oldest dropped.
    let o = topic(
        c,
        k,
        &["create", "logs", "--max-bytes", "4MiB", "--max-age", "1h"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for _ in 0..12 {
        let batch: Vec<Vec<u8>> = (0..64).map(|_| vec![7u8; 16 << 10]).collect();
        rt.block_on(client.publish("logs", batch)).unwrap();
    }
    let t = c.wait_for("retention by size", WAIT, || {
        let t = get(c, k, "logs")?;
        (t.first_offset > 0 && t.bytes <= 4 << 20)
            .then_some(t.clone())
            .ok_or(format!("{t:?}"))
    });
    assert_eq!(t.next_offset, 12 * 64);
    let o = topic(
        c,
        k,
        &["sub", "logs", "--from", "0", "--count", "1", "--json"],
    );
    let first: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(first["offset"].as_u64(), Some(t.first_offset));

    // Backpressure: a subscriber that takes nothing while 64 MiB are published does not make
    // the agent hold them (it lags on disk, or in the NATS server).
    let o = topic(c, k, &["create", "bulk"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pid = c.agent(k).pid().expect("agent running");
    rt.block_on(async {
        let mut stalled = client
            .subscribe("bulk", Start::Earliest, None)
            .await
            .unwrap();
        let batch = || -> Vec<Vec<u8>> { (0..64).map(|_| vec![3u8; 16 << 10]).collect() };
        client.publish("bulk", batch()).await.unwrap();
        let before = rss_bytes(pid);
        for _ in 0..63 {
            client.publish("bulk", batch()).await.unwrap();
        }
        let after = rss_bytes(pid);
        eprintln!("agent RSS {before} -> {after} bytes while 64 MiB passed a stalled subscriber");
        assert!(
            after < before + (24 << 20),
            "the agent grew from {before} to {after} bytes while a subscriber took nothing of \
             64 MiB"
        );
        // The stalled subscriber is still served, from where it was.
        let first = stalled.message().await.unwrap().unwrap();
        assert_eq!(first.messages[0].offset, 0);
    });

    // Removal.
    let o = topic(c, k, &["rm", "logs"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(get(c, k, "logs").is_err());
    let o = topic(c, k, &["rm", "logs"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
}

#[test]
fn conformance_standalone() {
    let c = agent(1, 1, None);
    conformance(&c, 1);
    // Standalone topics survive the agent's restart (offsets and groups included).
    let mut c = c;
    c.kill9(1);
    c.start(1);
    let t = c.wait_for("the topic back after a restart", CONVERGE, || {
        get(&c, 1, "orders")
    });
    assert_eq!(t.next_offset, 106);
    assert_eq!(t.groups.get("billing"), Some(&15));
}

#[test]
fn conformance_nats() {
    let Some(mut nats) = Nats::start() else {
        eprintln!(
            "SKIPPED: conformance_nats: no nats-server on PATH (dev/setup.sh installs Debian's \
             nats-server): the NATS pass-through half of the Catalyst suite did not run"
        );
        return;
    };
    let url = nats.url();
    let c = agent(2, 2, Some(&url));
    conformance(&c, 1);
    let rt = runtime();

    // Passed through: node 2 sees node 1's topic and messages (one NATS behind both).
    let o = topic(&c, 2, &["sub", "orders", "--from", "0", "--count", "1"]);
    assert_eq!(o.stdout.trim(), "first");
    let o = topic(&c, 1, &["ls"]);
    assert!(o.stdout.contains(&format!("backend {url}")), "{}", o.stdout);

    // The server goes away and comes back.
    let mut client = rt
        .block_on(Topics::connect(&c.agent(2).socket))
        .expect("client");
    let acked = rt
        .block_on(client.publish("orders", vec![b"before".to_vec()]))
        .unwrap();
    let mut open = rt
        .block_on(client.subscribe("orders", Start::Offset(acked[0]), None))
        .unwrap();
    let got = rt.block_on(open.message()).unwrap().unwrap();
    assert_eq!(got.messages[0].payload, b"before");
    nats.stop();
    let o = topic(&c, 1, &["pub", "orders", "lost?"]);
    assert_eq!(o.code, 5, "{}", o.stderr);
    assert!(
        o.stderr.contains("NATS backend is unavailable"),
        "{}",
        o.stderr
    );
    nats.run();
    let after = c.wait_for("publishing again after NATS came back", CONVERGE, || {
        let o = topic(&c, 1, &["pub", "orders", "after-restart"]);
        if o.code == 0 {
            Ok(o.stdout)
        } else {
            Err(o.stderr)
        }
    });
    assert!(after.contains("published 1 message"), "{after}");
    // Nothing acknowledged was lost: every acknowledged message is there, in order.
    let t = get(&c, 2, "orders").unwrap();
    let o = topic(
        &c,
        2,
        &[
            "sub",
            "orders",
            "--from",
            "0",
            "--count",
            &t.next_offset.to_string(),
        ],
    );
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len() as u64, t.next_offset);
    assert_eq!(lines[0], "first");
    assert_eq!(lines[acked[0] as usize], "before");
    assert_eq!(*lines.last().unwrap(), "after-restart");
    // The subscription open across the outage carries on from where it was.
    let next = rt
        .block_on(async { tokio::time::timeout(CONVERGE, open.message()).await })
        .expect("the open subscription delivers after the outage")
        .unwrap()
        .unwrap();
    assert_eq!(next.messages[0].offset, acked[0] + 1);
    assert_eq!(
        next.messages[0].payload,
        lines[acked[0] as usize + 1].as_bytes()
    );
}
