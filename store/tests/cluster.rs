//! In-process clusters of stores on 127.0.0.1: forwarding, CAS, batches, restart, leader loss,
//! voter replacement, a node cut off from the majority, and admission.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Fleet, Node, LOCAL, SNAPSHOT_EVERY};
use crux_store::{Applied, Change, Command, MusterEntry, Query, QueryResult, StoreError};
use tokio::net::TcpListener;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

struct Cluster {
    _tmp: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    /// `n` stores, the first `voters` of them initialized as the voters.
    async fn new(n: usize, voters: usize, snapshot_every: u64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = Fleet::default();
        let mut nodes = Vec::new();
        for i in 0..n {
            let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
            let dir = tmp.path().join(format!("n{i}"));
            nodes.push(Node::start(&fleet, 100 + i as u64, dir, listener, snapshot_every).await);
        }
        let c = Cluster { _tmp: tmp, nodes };
        if voters > 0 {
            c.nodes[0]
                .store
                .initialize(c.voters(0..voters))
                .await
                .unwrap();
            // Initializing twice (or on another voter) is a no-op.
            c.nodes[0]
                .store
                .initialize(c.voters(0..voters))
                .await
                .unwrap();
            c.leader(&(0..voters).collect::<Vec<_>>()).await;
        }
        c
    }

    fn voters(&self, range: impl IntoIterator<Item = usize>) -> BTreeMap<u64, SocketAddr> {
        range
            .into_iter()
            .map(|i| (self.nodes[i].id, self.nodes[i].netid))
            .collect()
    }

    /// Waits until every node in `among` knows the same leader, which is one of them; its index.
    async fn leader(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen: Vec<Option<u64>> = among
                .iter()
                .map(|&i| self.nodes[i].store.status().leader.map(|l| l.id))
                .collect();
            if let Some(Some(l)) = seen.first() {
                if seen.iter().all(|s| *s == Some(*l)) {
                    if let Some(&i) = among.iter().find(|&&i| self.nodes[i].id == *l) {
                        if self.nodes[i].store.status().role == "leader" {
                            return i;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no common leader: {seen:?}");
            // Wake on any metrics change of the first node, or poll again shortly.
            let mut m = self.nodes[among[0]].store.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(50), m.changed()).await;
        }
    }

    /// Waits until node `i` applied at least `index`.
    async fn applied(&self, i: usize, index: u64) {
        self.nodes[i]
            .store
            .wait_for(WAIT, "applied", |m| {
                m.last_applied.is_some_and(|l| l.index >= index)
            })
            .await
            .unwrap();
    }
}

fn entry(h: &str, a: &str, i: &str) -> MusterEntry {
    MusterEntry {
        horde: h.into(),
        api: a.into(),
        inst: i.into(),
        filename: format!("sha256:{:064x}", 7),
        function: "main".into(),
        timestamp_ms: crux_store::now_ms(),
    }
}

fn all_muster() -> Query {
    Query::MusterSearch {
        horde: None,
        api: None,
        inst: None,
    }
}

fn put(key: &str, value: &str, if_generation: Option<u64>) -> Command {
    Command::DocPut {
        key: key.into(),
        value: value.into(),
        if_generation,
    }
}

fn generation(a: &Applied) -> u64 {
    match a {
        Applied::Doc { generation, .. } => *generation,
        other => panic!("not a doc write: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_forward_cas_batch() {
    let c = Cluster::new(3, 3, SNAPSHOT_EVERY).await;
    let l = c.leader(&[0, 1, 2]).await;
    let f = (l + 1) % 3;
    let follower = &c.nodes[f].store;
    let mut changes = c.nodes[(l + 2) % 3].store.changes();

    // Writes through a follower are forwarded to the leader.
    for i in 0..3 {
        let a = follower
            .write(Command::MusterAdd(entry("h", "echo", &i.to_string())))
            .await
            .unwrap();
        assert_eq!(a, Applied::Ok);
    }
    follower
        .write(Command::MusterAdd(entry("g", "other", "0")))
        .await
        .unwrap();
    let g1 = generation(&follower.write(put("intent", "v1", Some(0))).await.unwrap());
    assert!(g1 > 0);

    // Consistent reads on every node see them.
    for n in &c.nodes {
        let QueryResult::Muster(found) = n
            .store
            .read(Query::MusterSearch {
                horde: Some("h".into()),
                api: None,
                inst: None,
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(found.len(), 3);
        assert_eq!(
            n.store
                .read(Query::DocGet {
                    key: "intent".into()
                })
                .await
                .unwrap(),
            QueryResult::Doc(Some(("v1".into(), g1)))
        );
        // And, once applied there, local (possibly stale) reads too.
        let idx = c.nodes[l].store.status().last_log_index.unwrap();
        c.applied(
            c.nodes.iter().position(|x| x.id == n.store.node()).unwrap(),
            idx,
        )
        .await;
        let QueryResult::Muster(local) = n.store.local(all_muster()) else {
            panic!()
        };
        assert_eq!(local.len(), 4);
    }

    // The watcher saw the changes in order.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let c = tokio::time::timeout(WAIT, changes.recv())
            .await
            .unwrap()
            .unwrap();
        // The group's id, named by its first leader, may come first.
        if !matches!(&c, Change::DocPut { key, .. } if key == crux_store::GROUP_KEY) {
            seen.push(c);
        }
    }
    assert!(matches!(&seen[0], Change::MusterAdded(e) if e.api == "echo" && e.inst == "0"));
    assert!(
        matches!(&seen[4], Change::DocPut { key, generation, .. } if key == "intent" && *generation == g1)
    );

    // Compare-and-swap.
    assert_eq!(
        follower.write(put("intent", "v2", Some(0))).await.unwrap(),
        Applied::Conflict {
            key: "intent".into(),
            current: g1
        }
    );
    let g2 = generation(&follower.write(put("intent", "v2", Some(g1))).await.unwrap());
    assert!(g2 > g1);
    assert_eq!(
        follower.write(put("intent", "v3", Some(g1))).await.unwrap(),
        Applied::Conflict {
            key: "intent".into(),
            current: g2
        }
    );

    // A batch is all or nothing: the failing CAS leaves the muster entry out.
    let bad = Command::Batch(vec![
        Command::MusterAdd(entry("h", "echo", "9")),
        put("intent", "v3", Some(g1)),
    ]);
    assert!(matches!(
        follower.write(bad).await.unwrap(),
        Applied::Conflict { .. }
    ));
    let good = Command::Batch(vec![
        Command::MusterAdd(entry("h", "echo", "9")),
        put("intent", "v3", Some(g2)),
    ]);
    let Applied::Batch(answers) = follower.write(good).await.unwrap() else {
        panic!()
    };
    assert_eq!(answers[0], Applied::Ok);
    let g3 = generation(&answers[1]);
    for n in &c.nodes {
        let QueryResult::Muster(found) = n
            .store
            .read(Query::MusterSearch {
                horde: None,
                api: None,
                inst: Some("9".into()),
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(found.len(), 1);
        assert_eq!(
            n.store
                .read(Query::DocList {
                    prefix: "int".into()
                })
                .await
                .unwrap(),
            QueryResult::Docs(vec![("intent".into(), "v3".into(), g3)])
        );
    }

    // Removal.
    let rm = Command::MusterRemove {
        horde: "h".into(),
        api: "echo".into(),
        inst: "9".into(),
    };
    assert_eq!(
        follower.write(rm.clone()).await.unwrap(),
        Applied::Removed(true)
    );
    assert_eq!(follower.write(rm).await.unwrap(), Applied::Removed(false));

    // Status: the leader reports the voters and their lag.
    let s = c.nodes[l].store.status();
    assert_eq!(s.role, "leader");
    assert_eq!(s.voters.len(), 3);
    let lag = s.lag.expect("the leader reports lag");
    assert_eq!(lag.len(), 3);
    let fs = follower.status();
    assert_eq!(fs.leader.map(|m| m.netid), Some(c.nodes[l].netid));
    assert!(fs.lag.is_none());
    // Status over gRPC.
    let remote = follower.remote_status(c.nodes[l].netid).await.unwrap();
    assert_eq!(remote.role, "leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_keeps_everything() {
    // Small snapshots so that both the snapshot and the log after it are recovered.
    let mut c = Cluster::new(3, 3, 7).await;
    let l = c.leader(&[0, 1, 2]).await;
    let w = &c.nodes[(l + 1) % 3].store;
    for i in 0..20 {
        w.write(Command::MusterAdd(entry("h", "a", &i.to_string())))
            .await
            .unwrap();
    }
    let g = generation(&w.write(put("doc", "kept", None)).await.unwrap());
    let last = c.nodes[l].store.status().last_log_index.unwrap();
    for i in 0..3 {
        c.applied(i, last).await;
    }
    assert!(c.nodes[l].store.metrics().borrow().snapshot.is_some());
    for n in &mut c.nodes {
        n.stop().await;
    }
    for n in &mut c.nodes {
        n.restart(7).await;
    }
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..3 {
        // Before anything new is written: what was committed is re-applied from disk.
        let QueryResult::Muster(found) = c.nodes[i].store.read(all_muster()).await.unwrap() else {
            panic!()
        };
        assert_eq!(found.len(), 20);
        assert_eq!(
            c.nodes[i]
                .store
                .read(Query::DocGet { key: "doc".into() })
                .await
                .unwrap(),
            QueryResult::Doc(Some(("kept".into(), g)))
        );
    }
    // Generations go on growing after a restart.
    let g2 = generation(
        &c.nodes[l]
            .store
            .write(put("doc", "new", Some(g)))
            .await
            .unwrap(),
    );
    assert!(g2 > g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_elects_a_new_leader() {
    let mut c = Cluster::new(3, 3, SNAPSHOT_EVERY).await;
    let l = c.leader(&[0, 1, 2]).await;
    let f = (l + 1) % 3;
    c.nodes[f]
        .store
        .write(Command::MusterAdd(entry("h", "a", "before")))
        .await
        .unwrap();
    let killed = Instant::now();
    c.nodes[l].stop().await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    // Writes through a survivor succeed within a few seconds (retrying while the election runs).
    let deadline = killed + Duration::from_secs(8);
    loop {
        match c.nodes[f]
            .store
            .write(Command::MusterAdd(entry("h", "a", "after")))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                eprintln!("while electing: {e}");
                assert!(
                    Instant::now() < deadline,
                    "no write after the leader loss: {e}"
                )
            }
        }
    }
    let took = killed.elapsed();
    eprintln!("first write after the leader's loss: {took:?}");
    let nl = c.leader(&rest).await;
    assert_ne!(nl, l);
    for &i in &rest {
        let QueryResult::Muster(found) = c.nodes[i].store.read(all_muster()).await.unwrap() else {
            panic!()
        };
        assert_eq!(found.len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_voters_replaces_a_voter() {
    // Node 3 starts empty; snapshots are small so it may catch up from one.
    let mut c = Cluster::new(4, 3, 5).await;
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..12 {
        c.nodes[0]
            .store
            .write(Command::MusterAdd(entry("h", "a", &i.to_string())))
            .await
            .unwrap();
    }
    // The log before the last snapshot is gone: node 3 catches up from a snapshot.
    c.nodes[l]
        .store
        .wait_for(WAIT, "purged", |m| m.purged.is_some())
        .await
        .unwrap();
    // Replace a non-leader voter with node 3, asked on a node that is not the leader.
    let gone = (l + 1) % 3;
    let ask = (l + 2) % 3;
    let keep: Vec<usize> = vec![l, ask, 3];
    c.nodes[ask]
        .store
        .set_voters(c.voters(keep.clone()))
        .await
        .unwrap();
    let s = c.nodes[l].store.status();
    let mut ids: Vec<u64> = s.voters.iter().map(|m| m.id).collect();
    ids.sort();
    let mut want: Vec<u64> = keep.iter().map(|&i| c.nodes[i].id).collect();
    want.sort();
    assert_eq!(ids, want);
    assert!(s.learners.is_empty(), "{s:?}");
    c.nodes[gone].stop().await;
    // The new voter has the data and the group takes writes.
    c.nodes[3]
        .store
        .write(Command::MusterAdd(entry("h", "a", "new")))
        .await
        .unwrap();
    let QueryResult::Muster(found) = c.nodes[3].store.read(all_muster()).await.unwrap() else {
        panic!()
    };
    assert_eq!(found.len(), 13);
    // Now lose the old leader too: the two left (one of them the new voter) are 2 of 3 voters, a
    // majority, so writes go on.
    c.nodes[l].stop().await;
    let rest = [ask, 3];
    c.leader(&rest).await;
    c.nodes[3]
        .store
        .write(Command::MusterAdd(entry("h", "a", "newer")))
        .await
        .unwrap();
    // set_voters is idempotent.
    let l2 = c.leader(&rest).await;
    let voters = c.voters(keep);
    let t = Instant::now();
    let r =
        tokio::time::timeout(Duration::from_secs(5), c.nodes[l2].store.set_voters(voters)).await;
    assert!(
        r.is_ok(),
        "set_voters with the same voters hung ({:?})",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_alone_refuses_writes() {
    for keep_leader in [true, false] {
        let mut c = Cluster::new(3, 3, SNAPSHOT_EVERY).await;
        let l = c.leader(&[0, 1, 2]).await;
        c.nodes[l]
            .store
            .write(Command::MusterAdd(entry("h", "a", "0")))
            .await
            .unwrap();
        let alone = if keep_leader { l } else { (l + 1) % 3 };
        for i in 0..3 {
            if i != alone {
                c.nodes[i].stop().await;
            }
        }
        let t = Instant::now();
        let r = c.nodes[alone]
            .store
            .write(Command::MusterAdd(entry("h", "a", "1")))
            .await;
        let took = t.elapsed();
        match r {
            Err(StoreError::NoQuorum(why)) => eprintln!("alone (leader {keep_leader}): {why}"),
            other => panic!("a lone node answered {other:?}"),
        }
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let t = Instant::now();
        let r = c.nodes[alone].store.read(all_muster()).await;
        assert!(matches!(r, Err(StoreError::NoQuorum(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // The stale local view still answers.
        let QueryResult::Muster(found) = c.nodes[alone].store.local(all_muster()) else {
            panic!()
        };
        assert!(found.len() <= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_off_the_node_plane_or_unlisted_are_refused() {
    use crux_proto::grpc::store::v1::{store_client::StoreClient, StatusRequest};
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let mut n = Node::start(
        &Fleet::default(),
        1,
        tmp.path().join("n"),
        listener,
        SNAPSHOT_EVERY,
    )
    .await;
    // A plaintext gRPC client gets no answer at all: its first bytes are not TLS.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", n.netid))
        .unwrap()
        .connect_lazy();
    let r = StoreClient::new(channel).status(StatusRequest {}).await;
    let s = r.expect_err("a plaintext caller is refused");
    // The connection closes under it (a transport error): no gRPC status ever comes from the
    // store itself.
    assert!(std::error::Error::source(&s).is_some(), "{s:?}");

    // A store of another fleet (a node the flock does not list) cannot reach it: forwarding to
    // it gets a clear error, not an acceptance.
    n.store
        .initialize([(1, n.netid)].into_iter().collect())
        .await
        .unwrap();
    n.store
        .wait_for(WAIT, "leader", |m| m.current_leader == Some(1))
        .await
        .unwrap();
    let other_listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
    let other = Node::start(
        &Fleet::default(),
        2,
        tmp.path().join("o"),
        other_listener,
        SNAPSHOT_EVERY,
    )
    .await;
    let r = other.store.remote_status(n.netid).await;
    assert!(r.is_err());
    let r = other
        .store
        .write(Command::MusterAdd(entry("h", "a", "0")))
        .await;
    assert!(r.is_err(), "{r:?}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_voter_grows_to_three_and_shutdown_is_clear() {
    let mut c = Cluster::new(3, 1, SNAPSHOT_EVERY).await;
    c.nodes[0]
        .store
        .write(put("k", "v", Some(0)))
        .await
        .unwrap();
    // Not a voter yet: a node outside the group has no leader to forward to.
    let r = c.nodes[1].store.write(put("k", "w", None)).await;
    assert!(matches!(r, Err(StoreError::NotInitialized)), "{r:?}");
    c.nodes[0].store.set_voters(c.voters(0..3)).await.unwrap();
    c.leader(&[0, 1, 2]).await;
    c.nodes[2].store.write(put("k", "w", None)).await.unwrap();
    assert_eq!(c.nodes[0].store.status().voters.len(), 3);
    c.nodes[1].stop().await;
    let r = c.nodes[1].store.write(put("k", "x", None)).await;
    assert!(matches!(r, Err(StoreError::Raft(_))), "{r:?}");
}

/// Write latency and throughput through a non-leader (run with `--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn write_latency_through_a_follower() {
    let c = Cluster::new(3, 3, SNAPSHOT_EVERY).await;
    let l = c.leader(&[0, 1, 2]).await;
    let follower = c.nodes[(l + 1) % 3].store.clone();
    let mut took = Vec::new();
    let start = Instant::now();
    for i in 0..500 {
        let t = Instant::now();
        follower
            .write(Command::MusterAdd(entry("h", "a", &i.to_string())))
            .await
            .unwrap();
        took.push(t.elapsed());
    }
    let total = start.elapsed();
    took.sort();
    eprintln!(
        "sequential: p50 {:?} p99 {:?}, {:.0} writes/s",
        took[took.len() / 2],
        took[took.len() * 99 / 100],
        took.len() as f64 / total.as_secs_f64()
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let s = follower.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                s.write(Command::MusterAdd(entry(
                    "c",
                    &w.to_string(),
                    &i.to_string(),
                )))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!(
        "16 concurrent writers: {:.0} writes/s",
        1600.0 / start.elapsed().as_secs_f64()
    );
}

/// `recover` on a stopped survivor, retried while openraft's tasks of the stopped store in this
/// process still hold the database.
async fn recover_when_released(node: &Node) -> crux_store::recover::Recovery {
    let deadline = Instant::now() + WAIT;
    loop {
        match crux_store::recover::recover(&node.dir, node.id, None) {
            Ok(r) => return r,
            Err(StoreError::Invalid(e)) if e.contains("in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("recover: {e}"),
        }
    }
}

/// Issue 7, "`crux store recover` for the case where a voter majority is gone for good": one
/// survivor's store is rewritten so that it is the only voter, keeps every entry up to its last
/// log entry, takes writes again, and the group grows back to three voters (a discarded survivor
/// and an empty node) without splitting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recover_makes_a_survivor_the_sole_voter_and_the_group_grows_back() {
    // Small snapshots: the survivor has both a snapshot and a log after it.
    let mut c = Cluster::new(4, 3, 7).await;
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..20 {
        c.nodes[l]
            .store
            .write(Command::MusterAdd(entry("h", "a", &i.to_string())))
            .await
            .unwrap();
    }
    let g = generation(
        &c.nodes[l]
            .store
            .write(put("doc", "kept", None))
            .await
            .unwrap(),
    );
    let last = c.nodes[l].store.status().last_log_index.unwrap();
    for i in 0..3 {
        c.applied(i, last).await;
    }
    // Refused while the store is open, and nothing changes.
    let r = crux_store::recover::recover(&c.nodes[0].dir, c.nodes[0].id, None);
    assert!(
        matches!(&r, Err(StoreError::Invalid(e)) if e.contains("stop the agent")),
        "{r:?}"
    );
    // The majority is lost for good; the survivor (a voter that was not the leader) is stopped.
    let survivor = (l + 1) % 3;
    let other = (l + 2) % 3;
    for n in &mut c.nodes {
        n.stop().await;
    }
    let kept = recover_when_released(&c.nodes[survivor]).await;
    assert_eq!(kept.node, c.nodes[survivor].id);
    assert_eq!(kept.last_log_index, last);
    assert_eq!(kept.muster_entries, 20);
    // The group's id (named by its first leader) is kept with the rest.
    let keys: Vec<&str> = kept.documents.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(keys, vec!["doc", crux_store::GROUP_KEY]);
    assert!(kept.documents.contains(&("doc".to_string(), g)));
    assert_eq!(kept.netid, c.nodes[survivor].netid);
    let old: Vec<u64> = kept.old_voters.iter().map(|m| m.id).collect();
    assert_eq!(old, vec![100, 101, 102]);
    let dropped: Vec<u64> = kept.dropped.iter().map(|m| m.id).collect();
    let mut want: Vec<u64> = [l, other].iter().map(|i| c.nodes[*i].id).collect();
    want.sort();
    assert_eq!(dropped, want);
    // A second look (dry run) shows the rewritten store: this node alone, the same last entry.
    let again =
        crux_store::recover::inspect(&c.nodes[survivor].dir, c.nodes[survivor].id, None).unwrap();
    assert_eq!(again.last_log_index, last);
    assert_eq!(
        again.old_voters.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![c.nodes[survivor].id]
    );

    // The survivor starts alone: it leads, everything is there, and writes succeed.
    c.nodes[survivor].restart(7).await;
    c.leader(&[survivor]).await;
    let s = &c.nodes[survivor].store;
    assert_eq!(s.status().voters.len(), 1);
    let QueryResult::Muster(found) = s.read(all_muster()).await.unwrap() else {
        panic!()
    };
    assert_eq!(found.len(), 20);
    assert_eq!(
        s.read(Query::DocGet { key: "doc".into() }).await.unwrap(),
        QueryResult::Doc(Some(("kept".into(), g)))
    );
    let g2 = generation(&s.write(put("doc", "after", Some(g))).await.unwrap());
    assert!(g2 > g, "generations go on: {g2} > {g}");

    // Another survivor is discarded: it starts empty, refuses to start a group of its own, and
    // joins the recovered one. Node 3 never held anything.
    let (held, aside) =
        crux_store::recover::discard(&c.nodes[other].dir, c.nodes[other].id).unwrap();
    assert_eq!(held.map(|h| h.last_log_index), Some(last));
    assert!(aside.join("store.redb").exists(), "set aside, not deleted");
    c.nodes[other].restart(7).await;
    c.nodes[3].restart(7).await;
    let o = &c.nodes[other].store;
    assert!(o.join_only());
    let r = o.initialize(c.voters([other])).await;
    assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    c.nodes[survivor]
        .store
        .set_voters(c.voters([survivor, other, 3]))
        .await
        .unwrap();
    c.leader(&[survivor, other, 3]).await;
    o.clear_join_only();
    assert!(!o.join_only(), "a member drops the marker");
    for i in [survivor, other, 3] {
        c.applied(i, c.nodes[survivor].store.status().last_log_index.unwrap())
            .await;
        let st = c.nodes[i].store.status();
        assert_eq!(st.voters.len(), 3, "node {i}: {st:?}");
        let QueryResult::Muster(found) = c.nodes[i].store.local(all_muster()) else {
            panic!()
        };
        assert_eq!(found.len(), 20, "node {i}'s own copy");
        assert_eq!(
            c.nodes[i].store.local(Query::DocGet { key: "doc".into() }),
            QueryResult::Doc(Some(("after".into(), g2)))
        );
    }
    // The grown group takes writes through the newcomer.
    c.nodes[3]
        .store
        .write(Command::MusterAdd(entry("h", "a", "grown")))
        .await
        .unwrap();
}
