//! Stores on full filesystems (issue 18, item 5): three in-process stores on 127.0.0.1, each in
//! its own small tmpfs. A full disk refuses writes with "disk full: <dir>" while reads and the
//! leader stay; the next write after space is freed succeeds. A write that finds no room stops
//! that node's Raft node; it reopens by itself once space returns, and catches up.
//!
//! Root only (mounting a tmpfs needs CAP_SYS_ADMIN): elsewhere each test prints why it skips.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Fleet, Node, LOCAL, SNAPSHOT_EVERY};
use crux_store::{Command, Query, QueryResult, StoreError};
use crux_tests::tmpfs::Tmpfs;
use tokio::net::TcpListener;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);
/// Each node's filesystem.
const DISK_BYTES: u64 = 8 << 20;
/// A document (1.5 MiB) that needs more room than a database holds already (one of a few bytes
/// may fit in pages freed earlier) and than the reserve, yet small enough for openraft to
/// replicate it within a heartbeat interval (its time limit for an append) on a debug build.
const BIG: usize = 3 << 19;

struct Cluster {
    nodes: Vec<Node>,
    disks: Vec<Tmpfs>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// Three voters, each store in `<tmpfs>/store`; Err (why) where no tmpfs can be mounted.
    async fn new() -> Result<Cluster, String> {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = Fleet::default();
        let mut disks = Vec::new();
        for i in 0..3 {
            disks.push(Tmpfs::mount(
                &tmp.path().join(format!("disk{i}")),
                DISK_BYTES,
            )?);
        }
        let mut nodes = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
            let dir = disk.dir().join("store");
            nodes.push(Node::start(&fleet, 100 + i as u64, dir, listener, SNAPSHOT_EVERY).await);
        }
        let voters: BTreeMap<u64, SocketAddr> = nodes.iter().map(|n| (n.id, n.netid)).collect();
        nodes[0].store.initialize(voters).await.unwrap();
        Ok(Cluster {
            nodes,
            disks,
            _tmp: tmp,
        })
    }

    /// Waits until every node in `among` knows the same leader, one of them; its index.
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
            if Instant::now() >= deadline {
                let all: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| (n.store.status(), n.store.disk_stats()))
                    .collect();
                panic!("no common leader: {seen:?}: {all:#?}");
            }
            let mut m = self.nodes[among[0]].store.metrics();
            let _ = tokio::time::timeout(Duration::from_millis(50), m.changed()).await;
        }
    }

    /// The documents node `i` holds (its local copy).
    fn local_docs(&self, i: usize) -> Vec<String> {
        match self.nodes[i].store.local(Query::DocList {
            prefix: "k/".into(),
        }) {
            QueryResult::Docs(d) => d.into_iter().map(|(k, _, _)| k).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Waits until node `i`'s copy holds exactly the documents `want`.
    async fn wait_docs(&self, i: usize, want: Vec<String>) {
        let deadline = Instant::now() + WAIT;
        while self.local_docs(i) != want {
            assert!(
                Instant::now() < deadline,
                "node {i}: {:?}",
                self.local_docs(i)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every store before the filesystems under them go.
    async fn stop(mut self) {
        for n in &mut self.nodes {
            n.stop().await;
        }
        drop(self.nodes);
        drop(self.disks);
    }
}

fn put(key: &str, value: String) -> Command {
    Command::DocPut {
        key: key.into(),
        value,
        if_generation: None,
    }
}

fn key(i: usize) -> String {
    format!("k/{i:03}")
}

fn keys(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(key).collect()
}

/// The skip message, printed where the test cannot mount.
fn skip(why: &str) {
    eprintln!("SKIPPED: disk-full store test needs a tmpfs: {why}");
}

/// All three disks full: writes through the leader and through a follower are refused with
/// "disk full: <the leader's store dir>" and append nothing; consistent reads keep working on
/// every node and the leader stays; a follower restarted on its full disk opens and follows;
/// once space is freed, the very next write succeeds, and a restart finds every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_keeps_reads_and_takes_the_next_write_once_freed() {
    let mut c = match Cluster::new().await {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..5 {
        c.nodes[l]
            .store
            .write(put(&key(i), "v".into()))
            .await
            .unwrap();
    }
    let term = c.nodes[l].store.status().term;
    let last_log = c.nodes[l].store.status().last_log_index;
    let fillers: Vec<_> = c.disks.iter().map(|d| d.fill("filler", 0)).collect();

    let f = (l + 1) % 3;
    let leader_dir = c.nodes[l].dir.display().to_string();
    for via in [l, f] {
        let e = c.nodes[via]
            .store
            .write(put(&key(5), "v".into()))
            .await
            .expect_err("a write on a full disk");
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("disk full: {leader_dir}")),
            "{text}"
        );
        assert_eq!(
            crux_store::grpc_status(e).code(),
            tonic::Code::ResourceExhausted
        );
    }
    // Nothing was appended, the leader did not change, and consistent reads answer everywhere.
    let st = c.nodes[l].store.status();
    assert_eq!((st.role.as_str(), st.term), ("leader", term));
    assert_eq!(st.last_log_index, last_log);
    for i in 0..3 {
        let r = c.nodes[i]
            .store
            .read(Query::DocList {
                prefix: "k/".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("read on node {i}: {e}"));
        let QueryResult::Docs(docs) = r else { panic!() };
        assert_eq!(docs.len(), 5, "node {i}");
    }
    let stats = c.nodes[l].store.disk_stats();
    assert!(stats.full, "{stats:?}");
    assert_eq!(stats.disk_full, 2, "{stats:?}");
    assert_eq!(stats.reopened, 0);
    // A follower restarted on its full disk opens (an existing store opens without writing)
    // and answers consistent reads again.
    c.nodes[f].restart(SNAPSHOT_EVERY).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c.nodes[f]
            .store
            .read(Query::DocList {
                prefix: "k/".into(),
            })
            .await;
        match r {
            Ok(QueryResult::Docs(docs)) if docs.len() == 5 => break,
            other => assert!(Instant::now() < deadline, "restarted follower: {other:?}"),
        }
    }
    // It writes nothing it can do without (the committed index) on a disk below the reserve,
    // so it stays a follower.
    assert_eq!(c.nodes[f].store.status().role, "follower");

    for filler in fillers {
        filler.free();
    }
    c.nodes[f]
        .store
        .write(put(&key(5), "v".into()))
        .await
        .expect("the next write once space is freed");
    assert!(!c.nodes[l].store.disk_stats().full);
    for i in 0..3 {
        c.wait_docs(i, keys(0..6)).await;
    }
    // The database the full disk left opens with every acknowledged write.
    c.nodes[l].restart(SNAPSHOT_EVERY).await;
    c.wait_docs(l, keys(0..6)).await;
    c.stop().await;
}

/// A write that passes the room check but finds no room (it is larger than what is left) stops
/// the leader's Raft node: the caller gets "disk full", the other two elect a leader and take
/// writes, the stopped node still answers local reads, and once space is freed it reopens by
/// itself (no restart) and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_finds_no_room_stops_that_node_which_reopens_by_itself() {
    let c = match Cluster::new().await {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..3 {
        c.nodes[l]
            .store
            .write(put(&key(i), "v".into()))
            .await
            .unwrap();
    }
    // Room for the reserve and a little more, not for a 1.5 MiB document.
    let filler = c.disks[l].fill("filler", crux_store::DISK_RESERVE_BYTES + (128 << 10));
    let e = c.nodes[l]
        .store
        .write(put(&key(3), "x".repeat(BIG)))
        .await
        .expect_err("a write larger than the room left");
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e:?}");
    assert!(e.to_string().starts_with("disk full: "), "{e}");
    let stats = c.nodes[l].store.disk_stats();
    assert!(stats.disk_full >= 1 && stats.full, "{stats:?}");
    assert_eq!(c.nodes[l].store.status().role, "shutdown");

    // The others carry on.
    let rest: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let l2 = c.leader(&rest).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match c.nodes[l2].store.write(put(&key(4), "v".into())).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
    }
    // The stopped node still answers from its copy, and says why it takes no write.
    assert!(c.local_docs(l).starts_with(&keys(0..3)));
    let e = c.nodes[l]
        .store
        .write(put(&key(5), "v".into()))
        .await
        .expect_err("the stopped node");
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e:?}");

    filler.free();
    let deadline = Instant::now() + WAIT;
    loop {
        let docs = c.local_docs(l);
        if docs.contains(&key(4)) && c.nodes[l].store.status().role == "follower" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {l} did not reopen and catch up: {docs:?} {:?}",
            c.nodes[l].store.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.nodes[l].store.disk_stats().reopened, 1);
    // Writes through it work again.
    c.nodes[l]
        .store
        .write(put(&key(5), "v".into()))
        .await
        .expect("a write through the reopened node");
    c.stop().await;
}

/// Both followers' disks full, the leader's not. A write too large for the room the followers'
/// databases already hold (512 KiB) cannot be committed (only one voter has room for it); while the
/// group sorts itself out (a follower whose append fails stops; one that can still record its
/// vote may be elected and then refuses writes on its full disk), such writes never succeed
/// and end up failing with "disk full: <a follower's store dir>" rather than a bare "no
/// quorum". Space freed: the stopped nodes reopen by themselves and every node follows one
/// leader with the same documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_out_of_room_fail_writes_with_disk_full_until_freed() {
    let c = match Cluster::new().await {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..3 {
        c.nodes[l]
            .store
            .write(put(&key(i), "v".into()))
            .await
            .unwrap();
    }
    let followers: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let fillers: Vec<_> = followers
        .iter()
        .map(|&i| c.disks[i].fill("filler", 0))
        .collect();
    let follower_dirs: Vec<String> = followers
        .iter()
        .map(|&i| c.nodes[i].dir.display().to_string())
        .collect();
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let path = loop {
        match c.nodes[l].store.write(put(&key(3), "v".repeat(BIG))).await {
            Ok(a) => panic!("a write no majority has room for was applied: {a:?}"),
            Err(StoreError::DiskFull { path, .. }) => break path,
            Err(e) => seen.push(e.to_string()),
        }
        assert!(Instant::now() < deadline, "no disk-full error: {seen:?}");
    };
    assert!(follower_dirs.contains(&path), "{path}");
    eprintln!("disk full after {} other errors: {seen:?}", seen.len());

    for filler in fillers {
        filler.free();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        match c.nodes[l].store.write(put(&key(4), "v".into())).await {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                let all: Vec<_> = (0..3)
                    .map(|i| (c.nodes[i].store.status(), c.nodes[i].store.disk_stats()))
                    .collect();
                panic!("no write after space came back: {e}: {all:#?}");
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l2 = c.leader(&[0, 1, 2]).await;
    let want = c.local_docs(l2);
    assert!(
        want.starts_with(&keys(0..3)) && want.contains(&key(4)),
        "{want:?}"
    );
    for i in 0..3 {
        c.wait_docs(i, want.clone()).await;
        let s = c.nodes[i].store.status();
        assert!(s.role == "leader" || s.role == "follower", "{s:?}");
        assert_eq!(s.disk_full, None, "{s:?}");
    }
    c.stop().await;
}

/// Only the leader's disk full: it refuses the write ("disk full: <its dir>") and hands
/// leadership to a voter with room, so writes succeed again with the disk still full; the old
/// leader follows (or, if recording its vote found no room, reopens once space is freed) and
/// every node ends with the same documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_out_of_room_hands_over_to_a_voter_with_room() {
    let c = match Cluster::new().await {
        Ok(c) => c,
        Err(why) => return skip(&why),
    };
    let l = c.leader(&[0, 1, 2]).await;
    for i in 0..3 {
        c.nodes[l]
            .store
            .write(put(&key(i), "v".into()))
            .await
            .unwrap();
    }
    let filler = c.disks[l].fill("filler", 0);
    let e = c.nodes[l]
        .store
        .write(put(&key(3), "v".into()))
        .await
        .expect_err("the leader has no room");
    let StoreError::DiskFull { path, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(path, &c.nodes[l].dir.display().to_string());
    // Through the old leader, with its disk still full: a new leader with room takes it.
    let deadline = Instant::now() + WAIT;
    loop {
        match c.nodes[l].store.write(put(&key(4), "v".into())).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rest: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let l2 = c.leader(&rest).await;
    assert_ne!(l2, l);
    let want = [keys(0..3), vec![key(4)]].concat();
    for &i in &rest {
        c.wait_docs(i, want.clone()).await;
    }
    filler.free();
    c.wait_docs(l, want).await;
    let s = c.nodes[l].store.status();
    assert!(s.role == "follower" || s.role == "leader", "{s:?}");
    c.stop().await;
}
