//! Blueprint K/V end to end (issue 16, items 1-4) on a flock of three real `crux agent`
//! processes: a put through a follower read on every node, compare-and-swap conflicts answered
//! with the current index, prefix listings and deletes, atomic transactions, a watch that sees
//! every change in order and resumes (by hand, and by the client library across an agent
//! restart) with nothing lost or repeated, a kill -9 of the Raft leader in the middle of writes
//! (no acknowledged write lost, the watch gapless), blocking HTTP reads, and bad input refused with a
//! clear message, a distinct exit code and nothing changed.

use std::time::{Duration, Instant};

use crux_proto::grpc::kv::v1 as pb;
use crux_reeve::kv::Kv;
use crux_tests::cluster::{http_get, Cluster};

mod common;
use common::{runtime, status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const CONVERGE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(15);

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `crux kv ARGS` on node k.
fn kv(c: &Cluster, k: usize, args: &[&str]) -> Out {
    let mut all = vec!["kv"];
    all.extend_from_slice(args);
    let o = c.cli(k, &all);
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `crux kv put KEY VALUE` on node k; the new modify index.
fn put(c: &Cluster, k: usize, key: &str, value: &str) -> u64 {
    let o = kv(c, k, &["put", key, value]);
    assert_eq!(o.code, 0, "node{k}: put {key}: {}", o.stderr);
    o.stdout
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no index in {:?}", o.stdout))
}

#[derive(serde::Deserialize, Debug)]
struct EntryJson {
    key: String,
    value: Option<String>,
    modify_index: u64,
    create_index: u64,
}

fn ls(c: &Cluster, k: usize, prefix: &str) -> Vec<EntryJson> {
    let o = kv(c, k, &["ls", prefix, "--json"]);
    assert_eq!(o.code, 0, "node{k}: ls: {}", o.stderr);
    serde_json::from_str(&o.stdout).expect("ls --json")
}

fn keys(c: &Cluster, k: usize, prefix: &str) -> Vec<String> {
    ls(c, k, prefix).into_iter().map(|e| e.key).collect()
}

/// The index a watch event's changes (not listings) carry, with their keys.
fn change(e: &pb::WatchEvent) -> Option<(u64, Vec<String>)> {
    (!e.snapshot).then(|| {
        let mut k: Vec<String> = e.entries.iter().map(|x| x.key.clone()).collect();
        k.extend(e.deleted.iter().map(|d| format!("-{d}")));
        (e.index, k)
    })
}

async fn next(
    rx: &mut tokio::sync::mpsc::Receiver<Result<pb::WatchEvent, crux_reeve::client::ClientError>>,
) -> Option<pb::WatchEvent> {
    loop {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Ok(e))) => return Some(e),
            // The agent went away: the library reports it and reconnects.
            Ok(Some(Err(e))) => eprintln!("watch: {e}"),
            Ok(None) | Err(_) => return None,
        }
    }
}

#[test]
fn kv_on_a_three_node_flock() {
    let mut c = Cluster::new(BIN, 1, 3, "local");
    c.start_all();
    let all = [1, 2, 3];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let st = c.wait_for("three voters and a leader", CONVERGE, || {
        let s = status(&c, 1)?;
        if s.voters.len() == 3 && !s.leader_addr.is_empty() {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    let leader = c.index_of(&st.leader_id).expect("the Raft leader is ours");
    let f = all.into_iter().find(|k| *k != leader).unwrap();
    let other = all.into_iter().find(|k| *k != leader && *k != f).unwrap();

    // A put through a follower, read (linearizably) on every node at once.
    let i1 = put(&c, f, "app/a", "hello");
    for k in all {
        let o = kv(&c, k, &["get", "app/a"]);
        assert_eq!(
            (o.code, o.stdout.as_str()),
            (0, "hello"),
            "node{k}: {}",
            o.stderr
        );
        let o = kv(&c, k, &["get", "app/a", "--json"]);
        let e: EntryJson = serde_json::from_str(&o.stdout).expect("get --json");
        assert_eq!((e.modify_index, e.create_index), (i1, i1));
    }
    // A missing key: exit 3.
    let o = kv(&c, other, &["get", "app/none"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(o.stderr.contains("no key"), "{}", o.stderr);

    // Compare-and-swap: a stale index is refused with the current one, exit 4, nothing written.
    let stale = (i1 - 1).to_string();
    let o = kv(&c, other, &["put", "--cas", &stale, "app/a", "lost"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert!(o.stderr.contains(&format!("at index {i1}")), "{}", o.stderr);
    let o = kv(&c, other, &["put", "--cas", "0", "app/a", "lost"]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert_eq!(kv(&c, leader, &["get", "app/a"]).stdout, "hello");
    let o = kv(&c, other, &["put", "--cas", &i1.to_string(), "app/a", "v2"]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    // Prefix listing.
    put(&c, leader, "app/b", "b");
    put(&c, other, "app/c/d", "d");
    put(&c, f, "apple", "not under app/");
    for k in all {
        assert_eq!(
            keys(&c, k, "app/"),
            ["app/a", "app/b", "app/c/d"],
            "node{k}"
        );
    }

    // A transaction with one failed check applies nothing; a good one applies everything.
    let dir = tempfile::tempdir().unwrap();
    let txn = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let ib = ls(&c, f, "app/b")[0].modify_index;
    let bad = txn(
        "bad.json",
        format!(
            r#"[{{"op":"put","key":"app/t1","value":"1"}},
                {{"op":"delete","key":"app/b"}},
                {{"op":"check","key":"app/b","index":{ib}}}]"#
        ),
    );
    let o = kv(&c, f, &["txn", &bad]);
    assert_eq!(o.code, 4, "{}", o.stderr);
    assert!(o.stderr.contains("operation 2"), "{}", o.stderr);
    assert_eq!(keys(&c, other, "app/"), ["app/a", "app/b", "app/c/d"]);
    let good = txn(
        "good.json",
        format!(
            r#"[{{"op":"check","key":"app/b","index":{ib}}},
                {{"op":"put","key":"app/t1","value":"1"}},
                {{"op":"put","key":"app/t2","value":"2","cas":0}}]"#
        ),
    );
    let o = kv(&c, f, &["txn", &good, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let it = r["index"].as_u64().unwrap();
    let listed = ls(&c, other, "app/t");
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|e| e.modify_index == it),
        "one index: {listed:?}"
    );

    // A watch from an index sees every later change, in order, once; dropped and resumed from
    // its last index, it continues with nothing lost or repeated; and the client library
    // resumes by itself across a restart of the agent it watches through.
    let rt = runtime();
    let from = it;
    let mut want = Vec::new();
    let socket3 = c.agent(other).socket.clone();
    let mut rx = rt.block_on(async {
        let w = Kv::connect(&socket3).await.expect("connect");
        w.watch("w/", true, from).await.expect("watch")
    });
    for i in 0..12 {
        let k = all[i % 3];
        let key = format!("w/{}", i % 5);
        want.push((put(&c, k, &key, &i.to_string()), vec![key]));
    }
    let o = kv(&c, f, &["rm", "w/0"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let i_rm: u64 = o.stdout.trim().rsplit(' ').next().unwrap().parse().unwrap();
    want.push((i_rm, vec!["-w/0".to_string()]));
    let mut seen = Vec::new();
    rt.block_on(async {
        while seen.len() < 6 {
            let e = next(&mut rx).await.expect("a change");
            seen.extend(change(&e));
        }
    });
    drop(rx);
    let last = seen.last().unwrap().0;
    let mut rx = rt.block_on(async {
        let w = Kv::connect(&socket3).await.expect("connect");
        w.watch("w/", true, last).await.expect("watch")
    });
    rt.block_on(async {
        // The delete and the puts before it.
        while seen.len() < 13 {
            let e = next(&mut rx).await.expect("a change");
            seen.extend(change(&e));
        }
    });
    assert_eq!(seen, want, "every change, in order, once");

    // The watched agent restarts: the library reconnects from its last index.
    c.kill9(other);
    let mut more = Vec::new();
    for i in 0..4 {
        let key = format!("w/r{i}");
        more.push((put(&c, [leader, f][i % 2], &key, "x"), vec![key]));
    }
    c.start(other);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let mut after = Vec::new();
    rt.block_on(async {
        while after.len() < more.len() {
            let e = next(&mut rx).await.expect("a change after the restart");
            assert!(!e.compacted, "the restarted agent still holds the changes");
            after.extend(change(&e));
        }
    });
    assert_eq!(after, more, "nothing lost or repeated across the restart");
    drop(rx);

    // kill -9 of the Raft leader in the middle of writes: no acknowledged write is lost, and a
    // watch on a survivor (resumed there from the last index seen above) sees every one, in
    // order, once.
    let st = status(&c, other).expect("store status");
    let raft_leader = c.index_of(&st.leader_id).expect("the Raft leader is ours");
    let survivors: Vec<usize> = all.into_iter().filter(|k| *k != raft_leader).collect();
    let from = after.last().unwrap().0;
    let sock = c.agent(survivors[0]).socket.clone();
    let mut rx = rt.block_on(async {
        let w = Kv::connect(&sock).await.expect("connect");
        w.watch("w/", true, from).await.expect("watch")
    });
    let mut acked = Vec::new();
    for i in 0..10 {
        if i == 3 {
            c.kill9(raft_leader);
        }
        let key = format!("w/k{i}");
        let writer = survivors[i % 2];
        let index = c.wait_for("a put acknowledged", WAIT, || {
            let o = kv(&c, writer, &["put", &key, "v"]);
            if o.code != 0 {
                return Err(format!("exit {}: {}", o.code, o.stderr));
            }
            o.stdout
                .trim()
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or(o.stdout)
        });
        acked.push((index, key));
    }
    let last_acked = acked.iter().map(|a| a.0).max().unwrap();
    let mut seen = Vec::new();
    rt.block_on(async {
        while seen
            .last()
            .is_none_or(|s: &(u64, Vec<String>)| s.0 < last_acked)
        {
            let e = next(&mut rx)
                .await
                .expect("a change after the leader's kill");
            assert!(!e.compacted, "the survivor holds every change");
            seen.extend(change(&e));
        }
    });
    drop(rx);
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in order, once: {seen:?}"
    );
    for (i, k) in &acked {
        assert!(
            seen.iter()
                .any(|(j, ks)| j == i && ks == std::slice::from_ref(k)),
            "{k} at {i} in {seen:?}"
        );
    }
    for &k in &survivors {
        let listed = keys(&c, k, "w/k");
        for (_, key) in &acked {
            assert!(listed.contains(key), "node{k}: {key} in {listed:?}");
        }
    }
    c.start(raft_leader);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    c.wait_for("the old leader serves K/V again", CONVERGE, || {
        let o = kv(&c, raft_leader, &["get", "w/k9"]);
        (o.code == 0).then_some(()).ok_or(o.stderr)
    });

    // Blocking HTTP reads: no change within the wait, the same answer after it; a change on
    // another node ends the wait early.
    let http = c.agent(f).http;
    let r = http_get(http, "/v1/kv/app/a").unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let index = header(&r, "x-crux-index");
    let t = now();
    let r = http_get(http, &format!("/v1/kv/app/a?index={index}&wait=1s")).unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "it waited");
    assert_eq!(header(&r, "x-crux-index"), index);
    let path = format!("/v1/kv/app/?recurse&index={index}&wait=30s");
    let blocked = std::thread::spawn(move || {
        let t = now();
        (http_get(http, &path), t.elapsed())
    });
    let ic = put(&c, leader, "app/c/d", "changed");
    let (r, took) = blocked.join().unwrap();
    let r = r.unwrap();
    assert!(took < Duration::from_secs(30), "woken by the change");
    assert!(header(&r, "x-crux-index") >= ic, "{r}");
    assert!(
        r.contains("\"Value\":\"Y2hhbmdlZA==\""),
        "the new value: {r}"
    );
    let r = http_get(http, "/v1/kv/app/a?raw").unwrap();
    assert!(r.ends_with("\r\n\r\nv2"), "{r}");
    let r = http_get(http, "/v1/kv/nothing/here").unwrap();
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = http_get(http, "/v1/kv/a?index=soon").unwrap();
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    // rm --prefix.
    let o = kv(&c, other, &["rm", "--prefix", "app/"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("deleted 5 keys"), "{}", o.stdout);
    for k in all {
        assert!(keys(&c, k, "app/").is_empty(), "node{k}");
        assert_eq!(keys(&c, k, "apple"), ["apple"]);
    }

    // Bad input: a clear message, exit 2, nothing changed.
    let before = ls(&c, f, "");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; (512 << 10) + 1]).unwrap();
    let big_arg = format!("@{}", big.display());
    let ops: Vec<String> = (0..65)
        .map(|i| format!(r#"{{"op":"put","key":"t/{i}","value":"v"}}"#))
        .collect();
    let many = txn("many.json", format!("[{}]", ops.join(",")));
    let garbled = txn("garbled.json", "[{\"op\":".into());
    for (args, why) in [
        (vec!["put", "", "x"], "empty key"),
        (vec!["put", "big", &big_arg], "at most 524288"),
        (vec!["put", "a/../b", "x"], "'..'"),
        (vec!["put", "crux/intent", "x"], "reserved for the system"),
        (vec!["txn", &many], "65 operations"),
        (vec!["txn", &garbled], "not a JSON list"),
        (vec!["rm", "--prefix", ""], "empty prefix"),
        (vec!["put", "--cas", "x1", "k", "v"], "invalid value 'x1'"),
    ] {
        let o = kv(&c, f, &args);
        assert_eq!(o.code, 2, "{args:?}: {} {}", o.stdout, o.stderr);
        assert!(o.stderr.contains(why), "{args:?}: {}", o.stderr);
    }
    let after = ls(&c, f, "");
    assert_eq!(
        after
            .iter()
            .map(|e| (&e.key, e.modify_index))
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|e| (&e.key, e.modify_index))
            .collect::<Vec<_>>(),
        "nothing changed"
    );
    assert!(after.iter().all(|e| e.value.is_some()));
}

fn header(response: &str, name: &str) -> u64 {
    response
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name)
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in {response}"))
}
