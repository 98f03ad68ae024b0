//! End-to-end tests of the durable store (issue 7) with real `crux agent` processes on loopback:
//! a muster entry added on one node is found on every node; kill -9 of the Raft leader keeps the
//! entry and new writes succeed within 10 s; a voter killed for longer than the grace period is
//! replaced; a restart of every agent keeps every entry.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crux_tests::cluster::Cluster;

mod common;
use common::{put_doc, reeve, runtime, status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(3);

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Waits until node 1 sees three voters and a Raft leader; its status then.
fn three_voters(c: &Cluster) -> common::Status {
    c.wait_for("three voters and a leader", CONVERGE, || {
        let s = status(c, 1)?;
        if s.voters.len() == 3 && !s.leader_addr.is_empty() {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
}

fn add(c: &Cluster, k: usize, inst: &str) -> Result<(), String> {
    common::muster_add(c, k, "galumph2", inst)
}

fn search(c: &Cluster, k: usize) -> Result<BTreeSet<String>, String> {
    common::muster_search(c, k, "galumph2")
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Three voters among five nodes, entries seen everywhere, the Raft leader's kill -9, a voter's
/// replacement after the grace period, and a restart of all five.
#[test]
fn muster_survives_leader_loss_voter_loss_and_a_full_restart() {
    let mut c = Cluster::new(BIN, 1, 5, PRESET);
    for k in 1..=5 {
        c.append_config(
            k,
            &format!("[store]\nvoter_grace = \"{}s\"\n", GRACE.as_secs()),
        );
    }
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let st = three_voters(&c);

    // Added on one node (a non-voter if there is one), found on every node.
    let outsider = (1..=5)
        .find(|k| !st.voter_ids.contains(&c.node_id(*k).unwrap()))
        .expect("two non-voters");
    add(&c, outsider, "galumph2_1").expect("add");
    for k in all {
        assert_eq!(
            search(&c, k).expect("search"),
            set(&["galumph2_1"]),
            "node{k}"
        );
    }

    // Documents: compare-and-swap on the generation, and a watch on another node sees the write.
    docs_cas_and_watch(&c, outsider, if outsider == 1 { 2 } else { 1 });

    // kill -9 of the Raft leader: the entry is still there and a new write succeeds within 10 s.
    let leader = c
        .index_of(&st.leader_id)
        .expect("the Raft leader is one of ours");
    c.kill9(leader);
    let killed = now();
    let rest: Vec<usize> = all.iter().copied().filter(|k| *k != leader).collect();
    let asker = rest[0];
    c.wait_for(
        "a write after the leader's loss",
        Duration::from_secs(10),
        || add(&c, asker, "galumph2_2"),
    );
    let took = killed.elapsed();
    eprintln!("first successful write {took:?} after the Raft leader's kill -9");
    assert!(took <= Duration::from_secs(10));
    for &k in &rest {
        assert_eq!(
            search(&c, k).expect("search"),
            set(&["galumph2_1", "galumph2_2"]),
            "node{k}"
        );
    }

    // The killed voter is replaced by a live member once the flock has held it dead for the
    // grace period.
    let dead_id = st.leader_id.clone();
    let replaced = c.wait_for("the dead voter replaced", CONVERGE, || {
        let s = status(&c, asker)?;
        if s.voter_ids.len() == 3 && !s.voter_ids.contains(&dead_id) {
            Ok(s)
        } else {
            Err(format!("voters {:?}", s.voter_ids))
        }
    });
    for id in &replaced.voter_ids {
        assert!(
            c.index_of(id).is_some_and(|k| k != leader),
            "{id} is a live node"
        );
    }

    // The old leader comes back; then every agent is restarted: all entries are still there.
    c.start(leader);
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    add(&c, leader, "galumph2_3").expect("add through the returned node");
    for k in all {
        c.kill9(k);
    }
    c.start_all();
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let want = set(&["galumph2_1", "galumph2_2", "galumph2_3"]);
    c.wait_for("every entry after a restart of all five", CONVERGE, || {
        for k in all {
            let got = search(&c, k)?;
            if got != want {
                return Err(format!("node{k}: {got:?}"));
            }
        }
        Ok(())
    });
}

fn docs_cas_and_watch(c: &Cluster, writer: usize, watcher: usize) {
    use crux_proto::grpc::reeve::v1 as pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = |k: usize| {
            let socket = c.agent(k).socket.clone();
            async move {
                let ch = crux_reeve::client::socket_channel(&socket, Duration::from_secs(5))
                    .await
                    .expect("socket");
                pb::reeve_client::ReeveClient::new(ch)
            }
        };
        let mut w = client(writer).await;
        let mut watch = client(watcher)
            .await
            .doc_watch(pb::DocWatchRequest {
                prefix: "intent/".into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = watch.message().await.expect("watch").expect("event");
        assert!(first.reset, "a watch starts with a listing: {first:?}");
        let put = |value: &str, gen: u64| pb::DocPutRequest {
            key: "intent/galumph2".into(),
            value: value.into(),
            if_generation: gen,
            unconditional: false,
        };
        let a = w.doc_put(put("v1", 0)).await.expect("put").into_inner();
        assert!(a.written, "created: {a:?}");
        let stale = w.doc_put(put("v1b", 0)).await.expect("put").into_inner();
        assert!(!stale.written, "only if absent");
        assert_eq!(stale.generation, a.generation);
        let b = w
            .doc_put(put("v2", a.generation))
            .await
            .expect("put")
            .into_inner();
        assert!(b.written && b.generation > a.generation, "{b:?}");
        let lost = w
            .doc_put(put("v3", a.generation))
            .await
            .expect("put")
            .into_inner();
        assert!(!lost.written, "a stale generation loses");
        let got = w
            .doc_get(pb::DocGetRequest {
                key: "intent/galumph2".into(),
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!((got.value.as_str(), got.generation), ("v2", b.generation));
        // The watcher on another node saw v1 then v2.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let e = tokio::time::timeout(Duration::from_secs(10), watch.message())
                .await
                .expect("a watch event in time")
                .expect("watch")
                .expect("event");
            if e.key == "intent/galumph2" {
                seen.push(e.value);
            }
        }
        assert_eq!(seen, ["v1", "v2"]);
    });
}

/// The partition test hook's file for node k (`[store] partition_file_for_tests`).
fn cut_file(c: &Cluster, k: usize) -> std::path::PathBuf {
    c.agent(k).dir.join("store-cut")
}

fn cut(c: &Cluster, k: usize) {
    std::fs::write(cut_file(c, k), b"cut\n").expect("write the cut file");
}

/// Waits until node k's muster holds exactly `want` (a healed node catching up).
fn sees_all(c: &Cluster, k: usize, want: &BTreeSet<String>) {
    c.wait_for(&format!("node{k} sees every write"), CONVERGE, || {
        let got = search(c, k)?;
        if got == *want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

fn heal(c: &Cluster, k: usize) {
    std::fs::remove_file(cut_file(c, k)).expect("remove the cut file");
}

/// Waits until node k's own copy of the store (not the leader's: a `DocWatch` lists the local
/// state machine, then its changes) holds document `key` = `value`.
fn wait_local_doc(c: &Cluster, k: usize, key: &str, value: &str) {
    use crux_proto::grpc::reeve::v1 as pb;
    let found = runtime().block_on(async {
        let mut watch = reeve(c, k)
            .await
            .doc_watch(pb::DocWatchRequest { prefix: key.into() })
            .await
            .expect("watch")
            .into_inner();
        tokio::time::timeout(CONVERGE, async {
            loop {
                match watch.message().await {
                    Ok(Some(e)) if e.key == key && e.value == value && !e.deleted => return true,
                    Ok(Some(_)) => {}
                    _ => return false,
                }
            }
        })
        .await
        .unwrap_or(false)
    });
    assert!(
        found,
        "node{k}'s own copy never held {key} = {value}\n{}",
        c.logs(40)
    );
}

/// A write on a node whose store traffic is cut fails with the "no quorum" error (the CLI exits
/// non-zero), and how long it took to fail.
fn refused(c: &Cluster, k: usize, inst: &str) -> Duration {
    let started = now();
    let r = add(c, k, inst);
    let took = started.elapsed();
    let err = r.expect_err("a write on a cut-off node must fail");
    assert!(err.contains("no quorum"), "node{k}: {err}");
    took
}

/// Issue 7, "a node partitioned away from the voter majority refuses writes and, after the heal,
/// sees every write the majority accepted": first a voter that follows, then the Raft leader
/// itself (the majority elects another leader and goes on).
#[test]
fn a_cut_off_node_refuses_writes_and_sees_the_majoritys_after_the_heal() {
    let mut c = Cluster::new(BIN, 2, 5, PRESET);
    for k in 1..=5 {
        // A long grace: the cut-off voter (alive in the flock) must stay a voter.
        c.append_config(
            k,
            &format!(
                "[store]\nvoter_grace = \"600s\"\npartition_file_for_tests = {:?}\n",
                cut_file(&c, k).display().to_string()
            ),
        );
    }
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let st = three_voters(&c);
    let mut want = set(&["before"]);
    c.wait_for("a first write", CONVERGE, || add(&c, 1, "before"));

    // 1. A voter that is not the Raft leader.
    let leader = c.index_of(&st.leader_id).expect("the leader is ours");
    let follower = st
        .voter_ids
        .iter()
        .filter_map(|id| c.index_of(id))
        .find(|k| *k != leader)
        .expect("a voter that follows");
    cut(&c, follower);
    let took = refused(&c, follower, "on_the_cut_follower");
    eprintln!("a write on a cut-off follower voter failed after {took:?}");
    let err = search(&c, follower).expect_err("a consistent read on a cut-off node fails");
    assert!(err.contains("no quorum"), "{err}");
    let majority: Vec<usize> = all.iter().copied().filter(|k| *k != follower).collect();
    for (n, k) in majority.iter().enumerate() {
        let inst = format!("majority_a{n}");
        c.wait_for("a write on the majority", CONVERGE, || add(&c, *k, &inst));
        want.insert(inst);
    }
    c.wait_for("a document on the majority", CONVERGE, || {
        put_doc(&c, majority[0], "cut/a", "while the follower was cut")
    });
    heal(&c, follower);
    sees_all(&c, follower, &want);
    wait_local_doc(&c, follower, "cut/a", "while the follower was cut");

    // 2. The Raft leader itself.
    let st = c.wait_for("a leader after the heal", CONVERGE, || {
        let s = status(&c, follower)?;
        if s.leader_id.is_empty() {
            Err(format!("{s:?}"))
        } else {
            Ok(s)
        }
    });
    let old = c.index_of(&st.leader_id).expect("the leader is ours");
    cut(&c, old);
    let cut_at = now();
    let took = refused(&c, old, "on_the_cut_leader");
    eprintln!("a write on the cut-off Raft leader failed after {took:?}");
    let rest: Vec<usize> = all.iter().copied().filter(|k| *k != old).collect();
    c.wait_for(
        "a write on the majority after the leader's cut",
        CONVERGE,
        || add(&c, rest[0], "majority_b0"),
    );
    eprintln!(
        "the majority accepted a write {:?} after its Raft leader was cut off",
        cut_at.elapsed()
    );
    want.insert("majority_b0".into());
    let new = status(&c, rest[0]).expect("status");
    assert_ne!(
        new.leader_id, st.leader_id,
        "the majority elected another leader"
    );
    assert!(new.term > st.term, "in a later term: {new:?} after {st:?}");
    for (n, k) in rest.iter().enumerate().skip(1) {
        let inst = format!("majority_b{n}");
        c.wait_for("a write on the majority", CONVERGE, || add(&c, *k, &inst));
        want.insert(inst);
    }
    c.wait_for("a document on the majority", CONVERGE, || {
        put_doc(&c, rest[1], "cut/b", "while the leader was cut")
    });
    // The old leader still refuses while cut off (it may still believe it leads).
    refused(&c, old, "still_cut");
    heal(&c, old);
    sees_all(&c, old, &want);
    wait_local_doc(&c, old, "cut/b", "while the leader was cut");
    // And it takes writes again.
    c.wait_for("a write through the healed node", CONVERGE, || {
        add(&c, old, "after_heal")
    });
    want.insert("after_heal".into());
    for k in all {
        c.wait_for("every node sees every write", CONVERGE, || {
            let got = search(&c, k)?;
            if got == want {
                Ok(())
            } else {
                Err(format!("node{k}: {got:?}"))
            }
        });
    }
}

/// `crux store recover ARGS --config <node k's config> --json`.
fn recover_cli(c: &Cluster, k: usize, args: &[&str]) -> serde_json::Value {
    let out = c
        .command()
        .args(["store", "recover", "--json", "--config"])
        .arg(c.agent(k).config())
        .args(args)
        .output()
        .expect("run crux store recover");
    assert!(
        out.status.success(),
        "node{k}: crux store recover {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("recover JSON")
}

/// Issue 7, "`crux store recover` for the case where a voter majority is gone for good": two of
/// the three voters are killed for good and the other nodes stopped; the survivor voter is
/// recovered, the two other survivors (learners) are discarded; started again, the survivor
/// leads alone, every entry is there, the flock leader grows the voters back to three from the
/// live members, and new writes succeed.
#[test]
fn recover_rebuilds_the_group_from_a_survivor_after_a_lost_majority() {
    let mut c = Cluster::new(BIN, 3, 5, PRESET);
    for k in 1..=5 {
        c.append_config(k, "[store]\nvoter_grace = \"600s\"\n");
    }
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let st = three_voters(&c);
    let voters: Vec<usize> = st
        .voter_ids
        .iter()
        .map(|id| c.index_of(id).expect("a voter of ours"))
        .collect();
    let others: Vec<usize> = all
        .iter()
        .copied()
        .filter(|k| !voters.contains(k))
        .collect();
    let want = set(&["r1", "r2", "r3"]);
    for (n, inst) in want.iter().enumerate() {
        c.wait_for("a write", CONVERGE, || add(&c, all[n], inst));
    }
    c.wait_for("a document", CONVERGE, || {
        put_doc(&c, 1, "recover/doc", "kept")
    });
    // Every node holds everything in its own copy (the non-voters are learners).
    for k in all {
        wait_local_doc(&c, k, "recover/doc", "kept");
    }

    // A majority of the voters is gone for good; the rest is stopped.
    let (lost, survivor) = (&voters[..2], voters[2]);
    for &k in lost {
        c.kill9(k);
    }
    for &k in others.iter().chain([survivor].iter()) {
        // Its exit status does not matter here, only that it stopped.
        let _ = c.sigterm(k, CONVERGE);
    }
    let ids: Vec<String> = (1..=5).map(|k| c.node_id(k).expect("node id")).collect();
    let id = |k: usize| ids[k - 1].clone();
    let dry = recover_cli(&c, survivor, &["--dry-run"]);
    assert_eq!(dry["recovered"], false);
    let kept = recover_cli(&c, survivor, &[]);
    assert_eq!(kept["recovered"], true);
    assert_eq!(kept["last_log_index"], dry["last_log_index"]);
    assert_eq!(kept["muster_entries"], 3, "{kept}");
    assert_eq!(kept["documents"][0][0], "recover/doc", "{kept}");
    let dropped: BTreeSet<String> = kept["dropped"]
        .as_array()
        .expect("dropped")
        .iter()
        .map(|m| format!("{:016x}", m["id"].as_u64().expect("id")))
        .collect();
    for &k in lost {
        assert!(dropped.contains(&id(k)), "{} dropped: {kept}", id(k));
    }
    for &k in &others {
        let d = recover_cli(&c, k, &["--discard"]);
        assert_eq!(d["discarded"], true, "{d}");
    }

    // The survivor first: it leads a group of one.
    c.start(survivor);
    c.wait_for("the survivor leads alone", CONVERGE, || {
        let s = status(&c, survivor)?;
        if s.leader_id == id(survivor) && s.voter_ids == vec![id(survivor)] {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    });
    // Then the discarded survivors: the voters grow back to three live members.
    for &k in &others {
        c.start(k);
    }
    let live: Vec<usize> = [survivor]
        .into_iter()
        .chain(others.iter().copied())
        .collect();
    c.stable_agreement(&live, Duration::from_secs(1), CONVERGE);
    let grown: BTreeSet<String> = live.iter().map(|k| id(*k)).collect();
    c.wait_for("three voters again", CONVERGE, || {
        let s = status(&c, others[0])?;
        let have: BTreeSet<String> = s.voter_ids.iter().cloned().collect();
        if have == grown && !s.leader_id.is_empty() {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    });
    let mut want = want;
    c.wait_for("a write after the recovery", CONVERGE, || {
        add(&c, others[1], "after")
    });
    want.insert("after".into());
    for &k in &live {
        c.wait_for("every entry on every live node", CONVERGE, || {
            let got = search(&c, k)?;
            if got == want {
                Ok(())
            } else {
                Err(format!("node{k}: {got:?}"))
            }
        });
        wait_local_doc(&c, k, "recover/doc", "kept");
    }
}

/// Node k's agent log from byte `from` on.
fn log_since(c: &Cluster, k: usize, from: usize) -> String {
    let text = std::fs::read_to_string(c.agent(k).dir.join("agent.log")).unwrap_or_default();
    text.get(from..).unwrap_or_default().to_string()
}

fn log_len(c: &Cluster, k: usize) -> usize {
    std::fs::metadata(c.agent(k).dir.join("agent.log")).map_or(0, |m| m.len() as usize)
}

/// Issue 23, item 3, "the store follows the majority": a flock leader without a majority of the
/// store's voters never tries to replace voters. The flock leader's store is cut off while a
/// fellow voter dies for good (past the grace period): its flock still sees a majority of the
/// voters alive (itself and the third), but no store leader with a majority is in reach, so it
/// leaves the voters as they are (no "changing the store's voters", no "store voters not changed;
/// will retry" loop) and says so once. Healed, it and the third voter are a majority: the dead
/// voter is replaced (here: dropped, there is no spare member), and every acknowledged write is
/// there.
#[test]
fn a_leader_cut_off_from_the_store_majority_never_changes_voters() {
    let mut c = Cluster::new(BIN, 4, 3, PRESET);
    for k in 1..=3 {
        c.append_config(
            k,
            &format!(
                "[store]\nvoter_grace = \"{}s\"\npartition_file_for_tests = {:?}\n",
                GRACE.as_secs(),
                cut_file(&c, k).display().to_string()
            ),
        );
    }
    c.start_all();
    let all = [1, 2, 3];
    let leader = c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let f = c.index_of(&leader.id).expect("the flock leader is ours");
    let st = c.wait_for("three voters and a leader", CONVERGE, || {
        let s = status(&c, f)?;
        if s.voters.len() == 3 && !s.leader_addr.is_empty() {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    assert!(st.voter_ids.contains(&leader.id), "{st:?}");
    let mut want = set(&["before"]);
    c.wait_for("a first write", CONVERGE, || add(&c, f, "before"));
    let others: Vec<usize> = all.iter().copied().filter(|k| *k != f).collect();
    let (dead, third) = (others[0], others[1]);
    let dead_id = c.node_id(dead).expect("id");

    // Cut the flock leader's store off, then kill a fellow voter for good.
    let from = log_len(&c, f);
    cut(&c, f);
    c.kill_node(dead);
    c.wait_for(
        "the flock leader to hold the dead voter dead",
        CONVERGE,
        || match c.members(f)?.iter().find(|m| m.id == dead_id) {
            Some(m) if m.state == "dead" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let dead_at = now();
    c.wait_for(
        "the flock leader to say it leaves the voters",
        CONVERGE,
        || {
            let log = log_since(&c, f, from);
            if log.contains("no store leader with a majority of its voters is in reach") {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    );
    // Well past the grace period (the replacement would have been tried by now), nothing tried.
    c.wait_for("three grace periods", CONVERGE, || {
        if dead_at.elapsed() >= GRACE * 3 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let log = log_since(&c, f, from);
    for never in ["changing the store's voters", "store voters not changed"] {
        assert!(
            !log.contains(never),
            "the cut-off flock leader tried to change the voters ({never:?}):\n{log}"
        );
    }
    let held = log
        .matches("no store leader with a majority of its voters is in reach")
        .count();
    assert_eq!(held, 1, "said once, not every tick:\n{log}");
    let st = status(&c, third).expect("status");
    assert_eq!(st.voters.len(), 3, "voters changed while cut: {st:?}");

    // Healed: the flock leader and the third voter are the majority; the dead voter goes.
    heal(&c, f);
    let st = c.wait_for("the voters to be the majority's", CONVERGE, || {
        let s = status(&c, third)?;
        if s.voter_ids.len() == 2 && !s.voter_ids.contains(&dead_id) && !s.leader_id.is_empty() {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    let mut ids: Vec<String> = [f, third].iter().filter_map(|k| c.node_id(*k)).collect();
    ids.sort();
    let mut got = st.voter_ids.clone();
    got.sort();
    assert_eq!(got, ids);
    c.wait_for("a write after the heal", CONVERGE, || {
        add(&c, third, "after")
    });
    want.insert("after".into());
    sees_all(&c, f, &want);
    sees_all(&c, third, &want);
}
