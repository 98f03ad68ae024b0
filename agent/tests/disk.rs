//! Disk trouble (issue 18, item 5) with real `crux agent` processes on loopback.
//!
//! * Full disks (root only: each node's store directory, and node 2's pastiche directory, is a
//!   small tmpfs the test mounts and fills). The Raft leader's disk alone full: it refuses the
//!   write ("disk full: <dir>") and a voter with room takes the lead. Every disk full: `crux
//!   muster add`, `crux pastiche put` and a pull from a peer fail with "disk full: <dir>" and
//!   change nothing; reads, the flock, the Raft leader and registry lookups keep working; the
//!   disk-full errors are counted in `/metrics`; once space is freed the very next write, put
//!   and pull succeed, with no restart.
//! * kill -9 (runs anywhere): every agent killed during a stream of store writes comes back with
//!   every acknowledged write; a node killed during a large pull comes back with no partial
//!   blob visible, `crux pastiche verify` passes, and the pull then completes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::grpc::reeve::v1 as pb;
use crux_tests::cluster::{http_get, wait_for, Cluster};
use crux_tests::tmpfs::Tmpfs;

mod common;
use common::{muster_add, muster_search, runtime, status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;
/// Each node's store filesystem.
const STORE_DISK: u64 = 16 << 20;
/// Node 2's pastiche filesystem.
const PASTICHE_DISK: u64 = 32 << 20;

#[allow(clippy::disallowed_methods)]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// A file of `len` pseudo-random bytes in the cluster dir (on the ordinary disk).
fn blob(c: &Cluster, name: &str, len: usize, seed: u64) -> PathBuf {
    let path = c.dir().join(name);
    let mut x = seed | 1;
    let mut buf = Vec::with_capacity(len + 8);
    while buf.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    buf.truncate(len);
    std::fs::write(&path, &buf).expect("write blob");
    path
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `crux pastiche put FILE --json` on node k: the digest, or the error.
fn put(c: &Cluster, k: usize, file: &Path) -> Result<String, String> {
    let out = c.cli(k, &["pastiche", "put", file.to_str().unwrap(), "--json"]);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("put JSON");
    Ok(v["digest"].as_str().expect("digest").to_string())
}

/// `crux pastiche get DIGEST -o TO --json` on node k: the JSON line, or the error.
fn get(c: &Cluster, k: usize, digest: &str, to: &Path) -> Result<serde_json::Value, String> {
    let to = to.to_str().unwrap();
    let out = c.cli(k, &["pastiche", "get", digest, "-o", to, "--json"]);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("get JSON: {e}"))
}

/// The digests node k lists.
fn listed(c: &Cluster, k: usize) -> Vec<String> {
    let out = c.cli(k, &["pastiche", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "ls")).expect("ls JSON");
    v["blobs"]
        .as_array()
        .expect("blobs")
        .iter()
        .map(|b| b["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// `crux pastiche verify --json` on node k passes: (checked, corrupt).
fn verify(c: &Cluster, k: usize) -> (u64, usize) {
    let out = c.cli(k, &["pastiche", "verify", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "verify")).expect("verify JSON");
    (
        v["checked"].as_u64().expect("checked"),
        v["corrupt"].as_array().expect("corrupt").len(),
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of sample `line` (`name{labels}`) in node k's `/metrics`.
fn metric(c: &Cluster, k: usize, sample: &str) -> u64 {
    let text = http_get(c.agent(k).http, "/metrics").expect("GET /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in node{k}'s metrics:\n{text}"))
}

/// Waits until node 1 sees three voters and a Raft leader; the leader's index.
fn store_leader(c: &Cluster) -> usize {
    let st = c.wait_for("three voters and a leader", CONVERGE, || {
        let s = status(c, 1)?;
        if s.voters.len() == 3 && !s.leader_id.is_empty() {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    c.index_of(&st.leader_id)
        .expect("the leader is one of ours")
}

fn set(api: &str, n: std::ops::Range<usize>) -> BTreeSet<String> {
    n.map(|i| format!("{api}_{i}")).collect()
}

/// Every store directory and node 2's pastiche directory full: writes refused with "disk full",
/// everything else served; space freed: the next write, put and pull succeed.
#[test]
fn full_disks_refuse_writes_keep_serving_and_recover_by_themselves() {
    let mut c = Cluster::new(BIN, 1, 3, PRESET);
    let mut disks = Vec::new();
    for k in 1..=3 {
        match Tmpfs::mount(&c.agent(k).dir.join("store"), STORE_DISK) {
            Ok(d) => disks.push(d),
            Err(why) => {
                eprintln!("SKIPPED: the disk-full test needs tmpfs mounts: {why}");
                return;
            }
        }
    }
    let pastiche2 = Tmpfs::mount(&c.agent(2).dir.join("pastiche"), PASTICHE_DISK)
        .expect("a tmpfs, as the others");
    c.start_all();
    let all = [1, 2, 3];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let leader = store_leader(&c);
    for i in 0..3 {
        muster_add(&c, 1 + i % 3, "disk1", &format!("disk1_{i}")).expect("muster add");
    }
    let file = blob(&c, "a.bin", 4 * MIB, 1);
    let digest = put(&c, 1, &file).expect("put on node 1");
    let members_before = c.members(2).expect("members");

    // ---- the Raft leader's disk full: it refuses, and hands over to a voter with room -------
    let mut fillers = vec![disks[leader - 1].fill("filler", 0)];
    let err = muster_add(&c, leader, "disk1", "disk1_3").expect_err("the leader has no room");
    let old_store = c.agent(leader).dir.join("store");
    assert!(
        err.contains(&format!("disk full: {}", old_store.display())),
        "{err}"
    );
    c.wait_for("a write once a voter with room leads", CONVERGE, || {
        muster_add(&c, leader, "disk1", "disk1_3")
    });
    let old = leader;
    let leader = store_leader(&c);
    assert_ne!(leader, old, "a voter with room leads");
    // Every write it refused is counted (the retries above until the hand-over, too).
    let refused = metric(
        &c,
        old,
        "crux_store_write_errors_total{reason=\"disk_full\"}",
    );
    assert!(refused >= 1, "{refused}");

    // ---- every store disk full, and node 2's pastiche disk --------------------------------
    for k in all.into_iter().filter(|k| *k != old) {
        fillers.push(disks[k - 1].fill("filler", 0));
    }
    let pastiche_filler = pastiche2.fill("filler", 0);
    let leader_store = c.agent(leader).dir.join("store");
    for k in [2, leader] {
        let err = muster_add(&c, k, "disk1", "disk1_9").expect_err("a write on full disks");
        assert!(
            err.contains(&format!("disk full: {}", leader_store.display())),
            "node{k}: {err}"
        );
        eprintln!("muster add on full disks: {err}");
    }
    // Reads, the flock, the Raft leader and the registry keep working.
    for k in all {
        assert_eq!(
            muster_search(&c, k, "disk1").expect("search"),
            set("disk1", 0..4),
            "node{k}"
        );
        let s = status(&c, k).expect("store status");
        assert_eq!(c.index_of(&s.leader_id), Some(leader), "node{k}: {s:?}");
        let found: Vec<serde_json::Value> = c.lookup(k, "api:pastiche1").expect("lookup");
        assert_eq!(found.len(), 3, "node{k}: {found:?}");
    }
    c.all_alive(&all).expect("all alive");
    c.agreement(&all).expect("one flock leader");
    assert_eq!(c.members(2).expect("members").len(), members_before.len());

    // Pastiche on node 2: a put and a pull fail clearly and leave nothing; verify passes.
    let pdir = c.agent(2).dir.join("pastiche");
    let small = blob(&c, "b.bin", MIB, 2);
    let err = put(&c, 2, &small).expect_err("a put on a full disk");
    assert!(
        err.contains(&format!("disk full: {}", pdir.display())),
        "{err}"
    );
    let out = c.dir().join("a.out");
    let err = get(&c, 2, &digest, &out).expect_err("a pull on a full disk");
    assert!(
        err.contains(&format!("disk full: {}", pdir.display())),
        "{err}"
    );
    eprintln!("pastiche get on a full disk: {err}");
    assert!(!out.exists());
    assert!(listed(&c, 2).is_empty());
    assert_eq!(files_in(&pdir.join("tmp")), Vec::<String>::new());
    assert_eq!(verify(&c, 2), (0, 0));

    let sample = "crux_store_write_errors_total{reason=\"disk_full\"}";
    assert_eq!(metric(&c, leader, sample), 2);
    assert_eq!(metric(&c, leader, "crux_store_disk_full"), 1);
    assert_eq!(
        metric(
            &c,
            2,
            "crux_pastiche_write_errors_total{reason=\"disk_full\"}"
        ),
        2
    );

    // ---- space returns --------------------------------------------------------------------
    for f in fillers {
        f.free();
    }
    pastiche_filler.free();
    muster_add(&c, 2, "disk1", "disk1_4").expect("the next write once space is freed");
    for k in all {
        c.wait_for("every node to see the new entry", CONVERGE, || {
            let got = muster_search(&c, k, "disk1")?;
            if got == set("disk1", 0..5) {
                Ok(())
            } else {
                Err(format!("node{k}: {got:?}"))
            }
        });
    }
    assert_eq!(metric(&c, leader, "crux_store_disk_full"), 0);
    for k in all {
        let s = status(&c, k).expect("store status");
        assert_eq!(c.index_of(&s.leader_id), Some(leader), "node{k}: {s:?}");
    }
    put(&c, 2, &small).expect("the next put once space is freed");
    let got = get(&c, 2, &digest, &out).expect("the next pull once space is freed");
    assert_eq!(got["size"].as_u64(), Some(4 * MIB as u64));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&file).unwrap());
    assert_eq!(verify(&c, 2), (2, 0));
    drop(pastiche2);
    drop(disks);
}

/// A document write through node k's local API.
fn put_doc_at(socket: &Path, key: &str) -> Result<(), String> {
    runtime().block_on(async {
        let ch = crux_reeve::client::socket_channel(socket, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?;
        let r = pb::reeve_client::ReeveClient::new(ch)
            .doc_put(pb::DocPutRequest {
                key: key.into(),
                value: "v".into(),
                if_generation: 0,
                unconditional: true,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        if r.written {
            Ok(())
        } else {
            Err(format!("not written: {r:?}"))
        }
    })
}

/// The keys of `keys` node k's store does not have (consistent reads).
fn missing_docs(c: &Cluster, k: usize, keys: &[String]) -> Result<Vec<String>, String> {
    runtime().block_on(async {
        let mut client = common::reeve(c, k).await;
        let mut missing = Vec::new();
        for key in keys {
            let r = client
                .doc_get(pb::DocGetRequest { key: key.clone() })
                .await
                .map_err(|s| format!("node{k}: {}", s.message()))?
                .into_inner();
            if !r.found {
                missing.push(key.clone());
            }
        }
        Ok(missing)
    })
}

/// kill -9 of every agent during a stream of store writes, and of a node during a large pull:
/// after the restart every acknowledged write is there, no partial blob is visible, verify
/// passes and the pull completes.
#[test]
fn kill9_during_writes_and_a_pull_leaves_nothing_corrupt() {
    let mut c = Cluster::new(BIN, 2, 3, PRESET);
    c.start_all();
    let all = [1, 2, 3];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    store_leader(&c);

    // A stream of writes through node 2 until its agent is gone.
    let socket = c.agent(2).socket.clone();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (acked, count) = (acked.clone(), count.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                let key = format!("stream/{i:05}");
                if put_doc_at(&socket, &key).is_err() {
                    return;
                }
                acked.lock().unwrap().push(key);
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    c.wait_for("20 acknowledged writes", CONVERGE, || {
        match count.load(Ordering::SeqCst) {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} so far")),
        }
    });
    for k in all {
        c.kill9(k);
    }
    writer.join().expect("writer");
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} writes acknowledged before every agent's kill -9",
        acked.len()
    );
    c.start_all();
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    for k in all {
        c.wait_for(
            "every acknowledged write after the restart",
            CONVERGE,
            || match missing_docs(&c, k, &acked)? {
                m if m.is_empty() => Ok(()),
                m => Err(format!("node{k} lacks {m:?}")),
            },
        );
    }

    // And it takes writes again.
    common::put_doc(&c, 3, "stream/after", "v").expect("a write after the restart");

    // A large pull on node 2, killed once it recorded verified pieces.
    let file = blob(&c, "big.bin", 64 * MIB, 3);
    let digest = put(&c, 1, &file).expect("put");
    let hex = digest.trim_start_matches("sha256:").to_string();
    let out = c.dir().join("big.out");
    let mut getter: Child = c
        .command()
        .args(["pastiche", "get", &digest, "-o"])
        .arg(&out)
        .arg("--socket")
        .arg(&c.agent(2).socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start get");
    let pdir = c.agent(2).dir.join("pastiche");
    let journal = pdir.join("tmp").join(format!("{hex}.have"));
    // Polled closely: the kill must come while the pull is still under way.
    let deadline = now() + CONVERGE;
    while !std::fs::metadata(&journal).is_ok_and(|m| m.len() >= 4) {
        assert!(now() < deadline, "no journal at {}", journal.display());
        std::thread::sleep(Duration::from_millis(2));
    }
    c.kill9(2);
    let _ = getter.kill();
    let _ = getter.wait();
    assert!(!out.exists(), "no output from the killed pull");
    assert!(
        !pdir.join("blobs/sha256").join(&hex).exists(),
        "a partial blob is not visible under its digest"
    );
    c.start(2);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    assert!(!listed(&c, 2).contains(&digest), "not listed before done");
    assert_eq!(verify(&c, 2), (0, 0));
    let got = wait_for(CONVERGE, || get(&c, 2, &digest, &out)).expect("the pull resumes");
    assert!(got["resumed"].as_u64().unwrap_or(0) > 0, "{got}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&file).unwrap());
    assert_eq!(verify(&c, 2), (1, 0));
}
