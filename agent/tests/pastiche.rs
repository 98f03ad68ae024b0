//! End-to-end tests of pastiche (issue 6, item 6) with real `crux agent` processes on loopback:
//! put on one node and get on another, a holder that serves corrupt pieces, kill -9 of the
//! puller mid-pull and a resumed pull, a store too small for the blob, and five nodes pulling one
//! blob at once from each other.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use crux_tests::cluster::{wait_for, Cluster};
use serde::Deserialize;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;

#[derive(Debug, Deserialize)]
struct Put {
    digest: String,
    size: u64,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Got {
    digest: String,
    size: u64,
    sources: std::collections::BTreeMap<String, u32>,
    resumed: u32,
}

/// A file of `len` pseudo-random bytes (from `seed`) in the cluster dir.
fn blob(c: &Cluster, name: &str, len: usize, seed: u64) -> PathBuf {
    let path = c.dir().join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("blob file"));
    let mut x = seed | 1;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        // xorshift64*: fast, and no two pieces alike.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    buf.truncate(len);
    f.write_all(&buf).expect("write blob");
    f.flush().expect("flush blob");
    path
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn put(c: &Cluster, k: usize, file: &Path) -> Put {
    let out = c.cli(k, &["pastiche", "put", file.to_str().unwrap(), "--json"]);
    serde_json::from_str(&ok(&out, "put")).expect("put JSON")
}

fn get(c: &Cluster, k: usize, digest: &str, to: &Path) -> Result<Got, String> {
    let out = c.cli(
        k,
        &[
            "pastiche",
            "get",
            digest,
            "-o",
            to.to_str().unwrap(),
            "--json",
        ],
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("get JSON: {e}"))
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// Blobs node k lists.
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

fn pastiche_dir(c: &Cluster, k: usize) -> PathBuf {
    c.agent(k).dir.join("pastiche")
}

/// Put on one node, get on another: the bytes are identical. Errors are clear and change
/// nothing: a malformed digest, a digest nobody holds.
#[test]
fn put_on_one_node_get_on_another() {
    let mut c = Cluster::new(BIN, 1, 3, PRESET);
    c.start_all();
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let file = blob(&c, "a.bin", 9 * MIB + 12345, 1);
    let p = put(&c, 1, &file);
    assert_eq!(p.size, (9 * MIB + 12345) as u64);
    assert!(p.digest.starts_with("sha256:"), "{}", p.digest);
    let out = c.dir().join("a.out");
    let got = get(&c, 3, &p.digest, &out).expect("node 3 gets the blob");
    assert_eq!(got.size, p.size);
    assert!(same_bytes(&file, &out), "bytes differ");
    assert_eq!(got.sources.values().sum::<u32>(), 3, "3 pieces of 4 MiB");
    assert_eq!(listed(&c, 3), std::slice::from_ref(&p.digest));

    // Errors: a malformed digest, an unknown one. Non-zero exit, a message, no output file.
    let missing = c.dir().join("missing.out");
    let bad = c.cli(
        3,
        &[
            "pastiche",
            "get",
            "sha256:xyz",
            "-o",
            missing.to_str().unwrap(),
        ],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sha256:<64 hex digits>"));
    let nobody = format!("sha256:{}", "ab".repeat(32));
    let err = get(&c, 3, &nobody, &missing).expect_err("nobody holds it");
    assert!(err.contains("no holder"), "{err}");
    assert!(!missing.exists(), "nothing written");
    // rm, pin, verify.
    let rm = c.cli(3, &["pastiche", "rm", &p.digest]);
    ok(&rm, "rm");
    assert!(listed(&c, 3).is_empty());
    let v = c.cli(1, &["pastiche", "verify", "--json"]);
    assert!(ok(&v, "verify").contains("\"corrupt\":[]"));
}

/// A holder that serves corrupt pieces (the test hook) is dropped, and the pull completes from
/// an honest holder.
#[test]
fn a_corrupt_holder_does_not_stop_the_pull() {
    let mut c = Cluster::new(BIN, 2, 3, PRESET);
    c.append_config(1, "[pastiche]\ncorrupt_serving_for_tests = true\n");
    c.start_all();
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let file = blob(&c, "b.bin", 17 * MIB, 2);
    let p1 = put(&c, 1, &file);
    let p2 = put(&c, 2, &file);
    assert_eq!(p1.digest, p2.digest);
    let out = c.dir().join("b.out");
    let got = get(&c, 3, &p1.digest, &out).expect("node 3 gets the blob");
    assert!(same_bytes(&file, &out), "bytes differ");
    let node1 = c.node_id(1).unwrap();
    assert_eq!(
        got.sources.get(&node1).copied().unwrap_or(0),
        0,
        "no piece accepted from the corrupt holder: {:?}",
        got.sources
    );
}

/// kill -9 of the puller (its agent) in the middle of a pull; after a restart a new get resumes
/// from the pieces it had verified and succeeds. A store too small for a blob fails the get
/// cleanly with nothing visible.
#[test]
fn an_interrupted_pull_resumes_and_a_small_store_fails_cleanly() {
    let mut c = Cluster::new(BIN, 3, 3, PRESET);
    c.append_config(3, "[pastiche]\nmax_size = \"4MiB\"\n");
    c.start_all();
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let file = blob(&c, "c.bin", 160 * MIB, 3);
    let p = put(&c, 1, &file);

    // Node 3's store is too small: a clear error, nothing listed, nothing left in tmp/.
    let small_out = c.dir().join("small.out");
    let err = get(&c, 3, &p.digest, &small_out).expect_err("too large for node 3");
    assert!(err.contains("does not fit"), "{err}");
    assert!(listed(&c, 3).is_empty());
    assert!(!small_out.exists());
    let tmp3 = pastiche_dir(&c, 3).join("tmp");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp3)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "left in {}: {leftovers:?}",
        tmp3.display()
    );

    // Node 2 pulls; kill -9 once it has recorded verified pieces.
    let out = c.dir().join("c.out");
    let mut getter: Child = c
        .command()
        .args(["pastiche", "get", &p.digest, "-o"])
        .arg(&out)
        .arg("--socket")
        .arg(&c.agent(2).socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start get");
    let hex = p.digest.trim_start_matches("sha256:").to_string();
    let journal = pastiche_dir(&c, 2).join("tmp").join(format!("{hex}.have"));
    c.wait_for(
        "node 2 to record verified pieces",
        CONVERGE,
        || match std::fs::metadata(&journal) {
            Ok(m) if m.len() >= 4 => Ok(()),
            _ => Err(format!("no journal at {}", journal.display())),
        },
    );
    c.kill9(2);
    let _ = getter.kill();
    let _ = getter.wait();
    assert!(!out.exists(), "no output from the killed pull");
    assert!(
        !pastiche_dir(&c, 2).join("blobs/sha256").join(&hex).exists(),
        "a partial blob is not visible under its digest"
    );
    c.start(2);
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let got = wait_for(CONVERGE, || get(&c, 2, &p.digest, &out)).expect("the pull resumes");
    assert!(got.resumed > 0, "resumed from verified pieces: {got:?}");
    assert!(same_bytes(&file, &out), "bytes differ");
}

/// Five nodes get one blob at once (put on node 1): all succeed, and at least three of the four
/// pullers received pieces from a node other than node 1.
#[test]
fn five_nodes_pull_one_blob_from_each_other() {
    let mut c = Cluster::new(BIN, 4, 5, PRESET);
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let file = blob(&c, "d.bin", 96 * MIB, 4);
    let p = put(&c, 1, &file);
    let putter = c.node_id(1).unwrap();
    let gets: Vec<(usize, PathBuf, Child)> = (2..=5)
        .map(|k| {
            let out = c.dir().join(format!("d{k}.out"));
            let child = c
                .command()
                .args(["pastiche", "get", &p.digest, "--json", "-o"])
                .arg(&out)
                .arg("--socket")
                .arg(&c.agent(k).socket)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start get");
            (k, out, child)
        })
        .collect();
    let mut from_others = 0;
    for (k, out, child) in gets {
        let o = child.wait_with_output().expect("get");
        let text = ok(&o, &format!("get on node {k}"));
        let got: Got = serde_json::from_str(&text).expect("get JSON");
        assert!(same_bytes(&file, &out), "node {k}: bytes differ");
        let others: u32 = got
            .sources
            .iter()
            .filter(|(n, _)| **n != putter)
            .map(|(_, p)| p)
            .sum();
        eprintln!("node {k}: sources {:?}", got.sources);
        if others > 0 {
            from_others += 1;
        }
    }
    assert!(
        from_others >= 3,
        "only {from_others} of 4 pullers got pieces from a node other than the putter"
    );
}
